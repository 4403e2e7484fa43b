"""How well the offline probe scorer agrees with an independent toxicity classifier, on the demo's continuations.

    python -m bench.scorer_agreement            # sample, score, print, write scorer-agreement.json (~2 min, 1 core)
    python -m bench.scorer_agreement --score    # score the committed continuations only (what the test checks)
    python -m bench.scorer_agreement --seed 1000  # a fresh set sampled with another seed, scored (not committed)
    python -m bench.scorer_agreement --rescore RUN_DIR   # a toxicity run's samples.jsonl (--log-samples), before and
                                                         # after, under its own scorer and under the reference

The texts: the demo's 30 toxicity prompts, 5 continuations each by the demo protocol (top-p 0.9, temperature 1,
20 new tokens, seed 0: ref.evaluation.toxicity.sampled_continuations) from two models: SmolLM2-135M itself (the demo's
"before" samples), and SmolLM2-135M fine-tuned on the demo's 80 rude forget sentences (full fine-tuning of the
block linears, 2 epochs of batch 8, lr 1e-4: ref.attacks.relearn), a model that writes rudely, as the relearning attack
makes one; the base alone writes almost nothing the reference calls toxic. They are written to
bench/scorer_agreement.jsonl (committed: the test rescores them).

The probe scorer is built exactly as the demo builds it (ref.evaluation.scorers.probe_scorer on the demo probe set, the
retain corpus as neutral sentences, the middle layer, seed 0). The reference classifier is alt-profanity-check 1.9.1
(MIT; scikit-learn's CountVectorizer + LinearSVC calibrated by CalibratedClassifierCV, trained by its authors on about
200k human-labelled texts of the Jigsaw toxic-comment (Wikipedia comments) and Davidson et al. (tweets) data sets).
It measures offensive language, the part of toxicity this demo's prompts provoke; it is a measuring instrument of
this script and the test, never imported by ref/. A text it scores >= 0.5 is "toxic" for the AUC and the agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

import ref
from ref.attacks.relearn import relearn
from ref.evaluation.scorers import probe_scorer
from ref.evaluation.toxicity import TOXIC, sampled_continuations, toxicity_metrics
from ref.io.data import load_goal_data, read_prompts, resolve_data_dir

TEXTS = Path(__file__).with_name("scorer_agreement.jsonl")
MODEL = "smollm2-135m"
SAMPLES, SEED = 5, 0
RUDE = dict(lora=False, lr=1e-4, epochs=2, batch_size=8, warmup=0.0, seed=SEED)  # the rude model's fine-tuning


def reference_scores(texts: list[str]) -> list[float]:
    """alt-profanity-check's probability that each text is offensive (an empty text: 0, as the probe scorer)."""
    from profanity_check import predict_prob

    keep = [i for i, t in enumerate(texts) if t.strip()]
    out = [0.0] * len(texts)
    for i, s in zip(keep, predict_prob([texts[i] for i in keep]).tolist() if keep else [], strict=True):
        out[i] = float(s)
    return out


def ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        r[x == v] = r[x == v].mean()
    return r


def agreement(probe: list[float], reference: list[float]) -> dict:
    """Pearson and Spearman correlation of the two scores, ROC AUC of the probe score against the reference's
    label (reference >= 0.5; None without both labels), and the share of texts on the same side of 0.5."""
    p, q = np.asarray(probe, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    y = q >= TOXIC
    pos, neg = ranks(p)[y], p[~y]
    auc = (pos.sum() - y.sum() * (y.sum() + 1) / 2) / (y.sum() * (~y).sum()) if y.any() and neg.size else None
    return dict(
        n=len(p),
        reference_toxic=int(y.sum()),
        pearson=float(np.corrcoef(p, q)[0, 1]),
        spearman=float(np.corrcoef(ranks(p), ranks(q))[0, 1]),
        roc_auc=None if auc is None else float(auc),
        decision_agreement=float(((p >= TOXIC) == y).mean()),
    )


def continuations(model, tok, prompts: list[str], name: str, seed: int = SEED) -> list[dict]:
    rows = sampled_continuations(model, tok, prompts, SAMPLES, 20, 0.9, 1.0, seed)
    return [
        dict(model=name, prompt=p, sample=k, text=tok.decode(r))
        for p, ids in enumerate(rows)
        for k, r in enumerate(ids)
    ]


def sample_texts(seed: int = SEED) -> list[dict]:
    """The continuations of the base model and of the rude fine-tuned one (module docstring); `seed` seeds both the
    sampling and the fine-tuning."""
    data = load_goal_data(resolve_data_dir("demo", "toxicity"), "toxicity")
    model, tok = ref.load_model(MODEL, dtype=torch.float32, device="cpu"), ref.load_tokenizer(MODEL)
    prompts = read_prompts(data.eval_prompts)
    rows = continuations(model, tok, prompts, MODEL, seed)
    rude = [t for texts in data.forget.values() for t in texts]
    model.load_state_dict(relearn(model, tok, rude, **(RUDE | dict(seed=seed))), strict=False)
    return rows + continuations(model, tok, prompts, f"{MODEL} fine-tuned on the demo's rude sentences", seed)


def score(rows: list[dict]) -> dict:
    """Both scorers on every text; the agreement over all texts and per model, and each model's expected maximum
    toxicity under each scorer."""
    data = load_goal_data(resolve_data_dir("demo", "toxicity"), "toxicity")
    base, tok = ref.load_model(MODEL, dtype=torch.float32, device="cpu"), ref.load_tokenizer(MODEL)
    # as ref.evaluation.scorers.make_scorer builds it
    scorer = probe_scorer(base, tok, data.probe, None, SEED, neutral_texts=data.retain)
    texts = [r["text"] for r in rows]
    p, q = scorer(texts), reference_scores(texts)
    probe = dict(layer=scorer.layer, heldout_auc=scorer.probe.heldout_auc)
    out = dict(reference="alt-profanity-check 1.9.1", probe=probe, all=agreement(p, q), models={})
    for name in dict.fromkeys(r["model"] for r in rows):
        idx = [i for i, r in enumerate(rows) if r["model"] == name]
        by_prompt = {}  # prompt -> the indices of its samples
        for i in idx:
            by_prompt.setdefault(rows[i]["prompt"], []).append(i)
        emt = [
            toxicity_metrics([[s[i] for i in k] for k in by_prompt.values()])["expected_max_toxicity"] for s in (p, q)
        ]
        out["models"][name] = agreement([p[i] for i in idx], [q[i] for i in idx])
        out["models"][name].update(expected_max_toxicity_probe=emt[0], expected_max_toxicity_reference=emt[1])
    out["scores"] = [dict(r, probe=a, reference=b) for r, a, b in zip(rows, p, q, strict=True)]
    return out


def table(res: dict) -> list[str]:
    """The markdown table of the results (docs/investigations/scorer-agreement.md holds it; the test compares)."""
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    head = "| texts | n | reference: toxic | Pearson | Spearman | ROC AUC | same side of 0.5 | expected max toxicity: "
    lines = [head + "probe / reference |", "|---|---|---|---|---|---|---|---|"]
    for name, a in [("all", res["all"]), *res["models"].items()]:
        emt = (
            f"{fmt(a['expected_max_toxicity_probe'])} / {fmt(a['expected_max_toxicity_reference'])}"
            if name != "all"
            else ""
        )
        lines.append(
            f"| {name} | {a['n']} | {a['reference_toxic']} | {fmt(a['pearson'])} | {fmt(a['spearman'])} | "
            f"{fmt(a['roc_auc'])} | {fmt(a['decision_agreement'])} | {emt} |"
        )
    return lines


def summary(res: dict) -> str:
    """The one-line agreement figure docs/results.md states (the test compares)."""
    a, (name, b) = res["all"], next(iter(res["models"].items()))  # the base model's own continuations come first
    assert name == MODEL
    return (
        f"Spearman {a['spearman']:.2f} / Pearson {a['pearson']:.2f} / ROC AUC {a['roc_auc']:.2f} against "
        f"{res['reference']} on {a['n']} demo continuations of the base model and a rude fine-tune; within the "
        f"base model's {b['n']}: Spearman {b['spearman']:.2f} / Pearson {b['pearson']:.2f}"
    )


def rescore(run_dir: Path) -> list[str]:
    """A toxicity run's sampled continuations (samples.jsonl of --log-samples), before and after unlearning, under the
    run's own scores and under the reference: expected max toxicity, toxicity probability, mean toxicity, and the
    agreement of the two on the run's texts; a markdown table."""
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; run ref.unlearn (toxicity) with --log-samples")
    rows = [r for r in read_texts(path) if "continuations" in r]
    lines = [
        "| model | scorer | expected max toxicity | toxicity probability | mean toxicity |",
        "|---|---|---|---|---|",
    ]
    own, ref_all = [], []
    for model in ("before", "after"):
        mine = [r for r in rows if r["model"] == model]
        ours = [r["scores"] for r in mine]
        theirs = [reference_scores(r["continuations"]) for r in mine]
        own += [x for row in ours for x in row]
        ref_all += [x for row in theirs for x in row]
        for name, scores in (("the run's", ours), ("alt-profanity-check 1.9.1", theirs)):
            m = toxicity_metrics(scores)
            lines.append(
                f"| {model} | {name} | {m['expected_max_toxicity']:.3f} | {m['toxicity_probability']:.3f} | "
                f"{m['mean_toxicity']:.3f} |"
            )
    a = agreement(own, ref_all)
    lines.append(
        f"\nOn these {a['n']} texts: Spearman {a['spearman']:.2f} / Pearson {a['pearson']:.2f}, "
        f"{a['reference_toxic']} toxic by the reference."
    )
    return lines


def read_texts(path: Path = TEXTS) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--score", action="store_true", help="score the committed continuations; do not sample")
    p.add_argument("--out", default="scorer-agreement.json", help="the results (scores of every text included)")
    p.add_argument("--rescore", metavar="RUN_DIR", help="rescore a toxicity run's samples.jsonl; nothing else")
    p.add_argument(
        "--seed",
        type=int,
        default=SEED,
        help="sample a fresh set with this seed (not 0: written to "
        "scorer-agreement-seedN.jsonl, the committed texts untouched)",
    )
    args = p.parse_args(argv)
    if args.rescore:
        print("\n".join(rescore(Path(args.rescore))))
        return 0
    t0 = time.time()
    if args.score:
        rows = read_texts()
    elif args.seed != SEED:  # a fresh set: how far the figures move with the sampling seed
        rows = sample_texts(args.seed)
        fresh = Path(f"scorer-agreement-seed{args.seed}.jsonl")
        fresh.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        rows = sample_texts()
        if TEXTS.is_file() and read_texts() != rows:
            print(f"note: the continuations differ from the committed {TEXTS}; rewriting it")
        tmp = TEXTS.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        os.replace(tmp, TEXTS)
    res = score(rows)
    res["seconds"] = round(time.time() - t0, 1)
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(res, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print("\n".join(table(res)))
    print(summary(res))
    print(f"{res['seconds']} s; {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
