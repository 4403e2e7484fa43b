"""ref's multiple-choice evaluation equals lm-evaluation-harness 0.4.13's, question by question.

The same questions (16 of the demo data's 80, every fifth, 7 subjects: a forget task in lm-eval's wmdp template, a
retain task in its mmlu template, each subject a task with lm-eval's description, as lm-eval's own mmlu is built) are
scored by lm-eval's HFLM (transformers) and by `python -m ref.evaluate --log-samples`, in the letter format (lm-eval's
mmlu / wmdp_bio templates) and in cloze (its mmlu_continuation template), on the offline SmolLM2-135M (no BOS) and on
the tiny Llama of tests/tiny_models.py, whose tokenizer post-processor adds a BOS. Asserted: identical context and
continuation strings, log-likelihoods within a stated tolerance, identical predictions, and the report that
`ref.evaluate --from-lm-eval` builds from lm-eval's results file equal to ref's own.

lm-eval is an optional extra (`pip install -e '.[lmeval]'`, which `make setup` installs): without it the test skips.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from ref.evaluation import evaluate as ev  # noqa: E402
from ref.io.checkpoint import resolve  # noqa: E402
from ref.io.data import resolve_data_dir  # noqa: E402
from ref.io.errors import RefError  # noqa: E402

TEMPLATES = Path(lm_eval.__file__).parent / "tasks"
LETTER_TEMPLATE = {
    "forget": TEMPLATES / "wmdp/_default_template_yaml",
    "retain": TEMPLATES / "mmlu/default/_default_template_yaml",
}
CLOZE_TEMPLATE = TEMPLATES / "mmlu/continuation/_continuation_template_yaml"
# lm-eval's own descriptions (lm_eval/tasks/mmlu/{default,continuation}/mmlu_*.yaml, wmdp/wmdp_*.yaml)
DESCRIPTION = {
    "letter": "The following are multiple choice questions (with answers) about {}.\\n\\n",
    "cloze": "The following are questions (with answers) about {}.\\n\\n",
}


def write_tasks(data: Path, tasks: dict[str, str], mode: str, out: Path) -> list[str]:
    """lm-eval task configs in `out` for the MC files of `data` (ref task -> role): one task per subject that
    includes lm-eval's own template file and reads that subject's rows from local jsonl, grouped by ref task as
    lm-eval groups mmlu (weighted by size). The group names follow lm-eval's ("wmdp_bio", "mmlu_continuation"),
    so that --from-lm-eval maps them back to ref's task names. Returns the group names."""
    groups = []
    for task, role in tasks.items():
        rows = [json.loads(line) for line in (data / "mc" / f"{task}.jsonl").read_text().splitlines()]
        group = task.replace("-", "_") + ("_continuation" if mode == "cloze" else "")
        leaves = []
        for subject in dict.fromkeys(r["subject"] for r in rows):
            name = f"{task.replace('-', '_')}_{subject.replace(' ', '_')}" + (
                "_continuation" if mode == "cloze" else ""
            )
            path = out / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in rows if r["subject"] == subject))
            template = CLOZE_TEMPLATE if mode == "cloze" else LETTER_TEMPLATE[role]
            (out / f"{name}.yaml").write_text(
                f"include: {template}\ntask: {name}\ndataset_path: json\ndataset_name: null\n"
                f"dataset_kwargs:\n  data_files:\n    test: {path}\n    dev: {path}\n  cache_dir: {out / 'hf'}\n"
                f'description: "{DESCRIPTION[mode].format(subject)}"\n'
            )
            leaves.append(name)
        (out / f"{group}.yaml").write_text(
            f"group: {group}\ntask: {json.dumps(leaves)}\naggregate_metric_list:\n  - metric: acc\n"
            "    weight_by_size: true\n"
        )
        groups.append(group)
    return groups


def lm_eval_run(lm, groups: list[str], task_dir: Path, out: Path) -> tuple[dict, Path]:
    """lm-eval's samples by task, and its results file written as `lm_eval --output_path` writes it."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    results = simple_evaluate(model=lm, tasks=groups, task_manager=manager, log_samples=True, num_fewshot=0)
    samples = results.pop("samples")
    EvaluationTracker(output_path=str(out)).save_results_aggregated(results=results, samples=samples)
    (path,) = out.glob("**/results_*.json")
    return samples, path


@pytest.fixture(scope="module")
def demo_eval_data(tmp_path_factory):
    """A data folder with only evaluation files (no forget or retain corpus): every fifth question of the demo's two
    MC tasks (CPU time: a question costs about 0.3 s of SmolLM2 forwards in each of ref and lm-eval)."""
    demo, root = resolve_data_dir("demo"), tmp_path_factory.mktemp("eval-data")
    (root / "mc").mkdir()
    for task in ("demo-astronomy", "demo-general"):
        lines = (demo / "mc" / f"{task}.jsonl").read_text().splitlines(keepends=True)
        (root / "mc" / f"{task}.jsonl").write_text("".join(lines[::5]))
    manifest = {"wmdp": {"eval_forget": ["mc/demo-astronomy.jsonl"], "eval_retain": ["mc/demo-general.jsonl"]}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


N = 16  # questions scored
MODELS = {
    # (model, BOS added, tolerance on |log-likelihood difference|). transformers and ref compute the same fp32 forward
    # with other kernels and in other orders, so sums differ in the last bits, more the deeper and wider the model.
    # SmolLM2 (30 layers): measured 2.9e-5 over the 128 log-likelihoods here, 4.3e-5 over all 80 demo questions; the
    # tiny Llama (4 layers of width 64): 3.8e-6 here, 7.6e-6 over all 80. The tolerances are about 5x the larger
    # measurement; the predictions are asserted identical besides.
    "smollm2": ("smollm2-135m", False, 2e-4),
    "tiny-llama-bos": ("tiny-llama", True, 4e-5),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_ref_equals_lm_eval_letter_and_cloze(name, tiny_dirs, demo_eval_data, tmp_path, capsys):
    from lm_eval.models.huggingface import HFLM

    alias, bos, tol = MODELS[name]
    if alias == "tiny-llama":
        folder = tiny_dirs["llama"]
    else:
        try:
            folder = resolve(alias)
        except RefError:
            pytest.skip("smollm2-135m is not prepared (python -m data_prep.smollm2)")
    lm = HFLM(pretrained=str(folder), dtype="float32", device="cpu", batch_size=16)
    tasks = {"demo-astronomy": "forget", "demo-general": "retain"}
    diffs = []
    for mode in ("letter", "cloze"):
        # ref: the CLI on a data folder without training corpora, the mode given on the command line
        out = tmp_path / mode / "ref.json"
        argv = ["--model", str(folder), "--goal", "wmdp", "--data", str(demo_eval_data), "--mc-mode", mode]
        assert ev.main([*argv, "--log-samples", "--out", str(out)]) == 0
        report = json.loads(out.read_text())
        assert report["bos_added"] is bos and report["mc_mode"] == mode
        ours = {(r["task"], r["prompt"]): r for r in map(json.loads, ev.samples_path(out).read_text().splitlines())}
        assert len(ours) == N

        # lm-eval: its own templates on the same rows
        task_dir = tmp_path / mode / "tasks"
        task_dir.mkdir()
        groups = write_tasks(demo_eval_data, tasks, mode, task_dir)
        samples, results_file = lm_eval_run(lm, groups, task_dir, tmp_path / mode / "lm-eval")
        theirs = [
            (g, s)
            for g, leaves in json.loads(results_file.read_text())["group_subtasks"].items()
            for leaf in leaves
            for s in samples[leaf]
        ]
        assert len(theirs) == N
        for group, s in theirs:
            task = group.removesuffix("_continuation").replace("_", "-")
            context = s["arguments"][0][0]
            mine = ours[(task, context)]  # the identical context string (KeyError otherwise)
            assert [a[0] for a in s["arguments"]] == [context] * 4
            assert [a[1] for a in s["arguments"]] == mine["targets"]  # identical continuations
            lls = [r[0][0] for r in s["resps"]]
            diffs += [abs(a - b) for a, b in zip(lls, mine["loglikelihoods"], strict=True)]
            metric = "acc" if mode == "letter" else "acc_norm"
            scores = lls if mode == "letter" else [x / len(c) for x, c in zip(lls, s["doc"]["choices"], strict=True)]
            assert max(range(4), key=lambda j: (scores[j], -j)) == mine["prediction"]  # identical predictions
            assert s[metric] == float(mine["correct"])

        # the report built from lm-eval's results file equals ref's own
        theirs_out = tmp_path / mode / "from-lm-eval.json"
        assert (
            ev.main(
                [
                    "--goal",
                    "wmdp",
                    "--from-lm-eval",
                    str(results_file),
                    "--data",
                    str(demo_eval_data),
                    "--out",
                    str(theirs_out),
                ]
            )
            == 0
        )
        built = json.loads(theirs_out.read_text())
        assert built["engine"]["name"] == "lm-evaluation-harness" and built["engine"]["version"] == "0.4.13"
        for task in tasks:
            keys = ("role", "accuracy", "n", "correct", "per_subject", "mode", "metric", "lm_eval_template", "shots")
            assert {k: built["tasks"][task][k] for k in keys} == {k: report["tasks"][task][k] for k in keys}
            assert built["tasks"][task].get("acc") == report["tasks"][task].get("acc")
        for key in ("forget", "retain", "s_unlearning"):
            assert built[key] == report[key]
    # the tokenizer's post-processor decides BOS in both: lm-eval 0.4.13 leaves add_bos_token unset
    assert (lm.tok_encode("a")[0] == lm.tokenizer.bos_token_id) is bos
    assert max(diffs) <= tol, max(diffs)
    print(f"{name}: max |ll diff| {max(diffs):.2e} over {len(diffs)} log-likelihoods")
