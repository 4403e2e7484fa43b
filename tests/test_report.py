"""Tests for ref/report.py: the figures of a run folder, on a synthetic run folder with known values."""

from __future__ import annotations

import importlib
import json
import struct
import sys

import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("matplotlib")

from ref.experiments.report import (
    load_probes,
    main,
    plot_losses,
    plot_probe_cosine,
    probe_cosine_matrix,
    report_bars,
    write_figures,
)
from ref.io.errors import RefError
from ref.io.runlog import read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = [2, 5, 9]
DPI = 120  # ref.report saves at 120 dpi


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])  # IHDR width, height


def metrics_rows(n: int = 8, layers: bool = True) -> list[dict]:
    rows = []
    for k in range(1, n + 1):
        row = dict(
            step=k,
            epoch=(k - 1) // 4,
            topic="toxic",
            forget_loss=100.0 / k,
            retain_loss=1e-4 * k,
            alpha=0.5 + 0.1 * k,
            reward=1.0,
            policy_mean=1.0 + 0.01 * k,
            policy_std=0.5,
            tokens_per_s=10.0,
            elapsed_s=float(k),
        )
        row["loss"] = row["forget_loss"] + row["alpha"] * row["retain_loss"]
        if layers:
            row["forget_loss_layers"] = {str(i): 10.0 ** (j - 1) / k for j, i in enumerate(LAYERS)}
        rows.append(row)
    return rows


@pytest.fixture
def run_dir(tmp_path):
    """A toxicity run folder in ref.unlearn's formats, plus a report.json in the flat before/after form."""
    d = tmp_path / "run"
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in metrics_rows()))
    trajectory = dict(start=1.0, end=1.08, min=1.0, max=1.08, paper_final_alpha=78.0)  # the alpha figure's title, line
    run = dict(settings=dict(goal="toxicity"), steps=8, model_type="llama", alpha_trajectory=trajectory)
    (d / "run.json").write_text(json.dumps(run))
    g = torch.Generator().manual_seed(0)
    save_file(
        {f"layer{i}.weight": torch.randn(32, generator=g) for i in LAYERS}
        | {f"layer{i}.bias": torch.tensor([0.1 * i]) for i in LAYERS},
        str(d / "probes.safetensors"),
    )
    report = dict(
        goal="toxicity",
        before=dict(expected_max_toxicity=0.6, mmlu=0.45, s=0.1),
        after=dict(expected_max_toxicity=0.2, mmlu=0.44, s=0.5),
    )
    (d / "report.json").write_text(json.dumps(report))
    return d


def test_write_figures_all(run_dir):
    paths = write_figures(run_dir)
    names = ["losses", "alpha", "probe_cosine", "probe_weights", "probe_weights_grid", "before_after"]
    assert paths == [run_dir / "figures" / f"{n}.png" for n in names]
    sizes = {p.stem: png_size(p) for p in paths}
    # Figure sizes in inches * dpi: the toxicity loss figure has the per-layer panel beside the total one (11 x 4
    # inches); the probe grid is 3 columns x 1 row of 3.2 x 2.4 inch panels for 3 layers.
    assert sizes["losses"] == (11 * DPI, 4 * DPI)
    assert sizes["probe_weights_grid"] == (round(3 * 3.2 * DPI), round(2.4 * DPI))


def test_write_figures_out_and_cli(run_dir, tmp_path, capsys):
    out = tmp_path / "elsewhere"
    assert main([str(run_dir), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [
            "losses.png",
            "alpha.png",
            "probe_cosine.png",
            "probe_weights.png",
            "probe_weights_grid.png",
            "before_after.png",
        ]
    )
    assert not (run_dir / "figures").exists()
    assert capsys.readouterr().out.count("wrote ") == 6


def test_wmdp_run_without_probes_or_report(tmp_path):
    """No forget_loss_layers, no policy fields (fixed alpha), no probes, no report: losses and alpha only."""
    rows = [
        {k: v for k, v in r.items() if k not in ("forget_loss_layers", "policy_mean", "policy_std")}
        for r in metrics_rows(layers=False)
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths = write_figures(tmp_path)
    assert [p.name for p in paths] == ["losses.png", "alpha.png"]
    assert png_size(paths[0]) == (6 * DPI, 4 * DPI)  # one panel: no per-layer losses


def test_figures_are_deterministic(run_dir, tmp_path):
    probes = load_probes(run_dir / "probes.safetensors")
    a = plot_probe_cosine(probes, tmp_path / "a.png").read_bytes()
    b = plot_probe_cosine(probes, tmp_path / "b.png").read_bytes()
    assert a == b
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert plot_losses(rows, tmp_path / "c.png").read_bytes() == plot_losses(rows, tmp_path / "d.png").read_bytes()


def test_probe_cosine_matrix_by_hand():
    # u1 = (3, 4, 0) / 5, u2 = (4, 0, 3) / 5: cos = 12 / 25 = 0.48. w3 = -u1 * 7: cos(1, 3) = -1, cos(2, 3) = -0.48.
    # Scales differ on purpose (directions, not raw weights); layers given out of order to check the sorting.
    probes = {9: torch.tensor([-21.0, -28.0, 0.0]), 2: torch.tensor([3.0, 4.0, 0.0]), 5: torch.tensor([8.0, 0.0, 6.0])}
    cos = probe_cosine_matrix(probes)
    expected = torch.tensor([[1.0, 0.48, -1.0], [0.48, 1.0, -0.48], [-1.0, -0.48, 1.0]], dtype=torch.float64)
    assert cos.dtype == torch.float64
    torch.testing.assert_close(cos, expected, atol=1e-12, rtol=0)  # float64 of exact small integers
    torch.testing.assert_close(cos, cos.T, atol=0, rtol=0)


def test_probe_cosine_matrix_of_run_probes(run_dir):
    """Against an independent computation: torch.nn.functional.cosine_similarity pair by pair."""
    probes = load_probes(run_dir / "probes.safetensors")
    assert list(probes) == LAYERS and all(w.shape == (32,) for w in probes.values())
    cos = probe_cosine_matrix(probes)
    for a, i in enumerate(LAYERS):
        for b, j in enumerate(LAYERS):
            ref = torch.nn.functional.cosine_similarity(probes[i].double(), probes[j].double(), dim=0)
            assert abs(cos[a, b].item() - ref.item()) < 1e-12  # both float64 on 32-dim vectors
    assert torch.allclose(cos.diagonal(), torch.ones(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_probe_cosine_matrix_zero_weight():
    with pytest.raises(ValueError, match="all zeros"):
        probe_cosine_matrix({1: torch.zeros(4), 2: torch.ones(4)})


def test_report_bars_forms():
    flat = dict(goal="wmdp", before=dict(acc=0.6, s=0.1, only_before=1.0), after=dict(acc=0.3, s=0.5, flag=True))
    assert report_bars(flat) == {"acc": (0.6, 0.3), "s": (0.1, 0.5)}
    # Nested (an evaluation report per side): dotted names; counts and timings are not metrics.
    nested = dict(
        before=dict(tasks={"wmdp-bio": dict(accuracy=0.6, n=10, seconds=2.0, protocol="cloze")}),
        after=dict(tasks={"wmdp-bio": dict(accuracy=0.3, n=10, seconds=2.5, protocol="cloze")}),
    )
    assert report_bars(nested) == {"tasks.wmdp-bio.accuracy": (0.6, 0.3)}
    listed = dict(metrics=[dict(name="tox", before=0.6, after=0.2), dict(name="bad", before="x", after=1)])
    assert report_bars(listed) == {"tox": (0.6, 0.2)}
    assert report_bars(dict(goal="wmdp", tasks={})) == {}


def test_odd_report_is_skipped_with_a_notice(run_dir, capsys):
    (run_dir / "report.json").write_text(json.dumps(dict(goal="wmdp", tasks={"a": {"accuracy": 0.5}})))
    paths = write_figures(run_dir)
    assert "before_after.png" not in [p.name for p in paths]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no before/after metrics" in err[0]


def test_read_metrics_cut_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')  # a run still writing its last line
    assert [r["step"] for r in read_metrics(p)] == [1, 2]
    p.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(RefError, match="line 2"):
        read_metrics(p)


def test_not_a_run_folder(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_without_matplotlib(run_dir, monkeypatch, capsys):
    """ref.report imports without matplotlib; drawing then fails with one line naming the install command."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)  # None in sys.modules makes the import raise ImportError
    monkeypatch.delitem(sys.modules, "ref.experiments.report")
    report = importlib.import_module("ref.experiments.report")
    assert report.main([str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install matplotlib" in err[0]
