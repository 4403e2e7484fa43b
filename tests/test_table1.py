"""python -m ref.table1 end to end on a tiny model and tiny data (the same code path as
`--models smollm2-135m --data demo` and the paper's grid)."""

from __future__ import annotations

import json

from ref import table1
from tests.test_unlearn import data_dir  # noqa: F401 (the tiny data folder fixture)


def test_table1_runs_every_method_and_goal_then_skips_done_runs(tiny_dirs, data_dir, tmp_path, capsys):  # noqa: F811
    model = str(tiny_dirs["llama"])
    argv = ["--models", model, "--data", str(data_dir), "--out", str(tmp_path), "--max-steps", "2",
            "--eval-samples", "1", "--no-compile"]  # fmt: skip
    assert table1.main(argv) == 0
    table = json.loads((tmp_path / "table1.json").read_text())
    for goal in ("wmdp", "toxicity"):
        rows = table[model][goal]
        assert set(rows) == {"base", "rmu", "adaptive-rmu", "ours"}
        for cells in rows.values():
            assert 0 <= cells["S"] <= 1 and 0 <= cells["R"] <= 1
    for method in ("base", "rmu", "adaptive-rmu", "ours"):
        tox = table[model]["toxicity"][method]  # fluency (perplexity under the base model) and distinct-1/2/3
        assert tox["fluency"] > 1 and len(tox["distinct"]) == 3 and "fluency" not in table[model]["wmdp"][method]
    md = (tmp_path / "table1.md").read_text()
    assert md.count(f"| {model} |") == 4 and "wmdp: S" in md and "toxicity: S" in md
    assert "toxicity: fluency ppl | toxicity: distinct-1/2/3" in md
    reports = sorted(tmp_path.glob("llama/*/report.json"))
    assert len(reports) == 6
    stamps = [p.stat().st_mtime_ns for p in reports]
    assert table1.main(argv) == 0  # everything done: nothing runs again
    assert [p.stat().st_mtime_ns for p in reports] == stamps
    assert capsys.readouterr().out.count("| base |") == 2
    # the attacked columns: U of each unlearned model under the attack, its strongest setting (ref.attack)
    assert table1.main([*argv, "--attacks", "quantize"]) == 0
    assert len(list(tmp_path.glob("llama/*.attack/attack.json"))) == 6
    assert [p.stat().st_mtime_ns for p in reports] == stamps  # the runs themselves are not run again
    attacked = json.loads((tmp_path / "table1.json").read_text())[model]["wmdp"]["ours"]["U after quantize"]
    runs = json.loads((tmp_path / "llama" / "wmdp-ours.attack" / "attack.json").read_text())["attacks"]["quantize"]
    assert attacked == max(r["unlearned"]["U"] for r in runs.values())
    assert "wmdp: U after quantize" in (tmp_path / "table1.md").read_text()
