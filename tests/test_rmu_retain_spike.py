"""Why an RMU run's logged retain loss (eq. 3) can jump on one step, measured on SmolLM2-135M
(docs/investigations/rmu-retain-jump.md).

Hub-data runs of rmu and adaptive-rmu (SmolLM2-135M, toxicity, registry defaults, 100 steps) logged a retain loss
of 3.78 and 7.83 on step 100 against 0.1-0.6 before. What is measured here:

- the schedule: step 100 is an ordinary step (epoch 0, retain batch 99 of the epoch's shuffle, 4 texts, read once;
  no wrap, no epoch boundary, no short batch) for any retain corpus of 400 texts or more;
- the mechanism, after the demo's whole RMU toxicity run (40 steps, registry defaults): the first real position,
  whose residual stream is the attention sink (norm ~635 at layer 7 against 115), moves least of all positions;
  positions 1-15 move about twice as much as later ones; one retain text whose words are close to the forget corpus
  lifts a batch's eq. 3 by more than 10x (its tokens are steered towards c * u like forget tokens), while a heading
  or a short line lifts it by less than 1.5x, and a batch of four short lines by 3-10x.

Which kind of batch the real step 100 held is a hypothesis: the hub data cannot be read here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from data_prep.smollm2 import prepare_smollm2
from ref.io.checkpoint import load_model
from ref.io.config_json import read_config
from ref.io.data import GoalData, batches, load_goal_data, resolve_data_dir
from ref.io.tokenizer import load_tokenizer
from ref.losses import rmu_retain_loss
from ref.objectives import OBJECTIVES, Activations, Targets, random_directions
from ref.run.fused import eager
from ref.run.plan import Settings, resolve
from ref.train import Run, encode, schedule, shared_prefix, start_state, step, taps

# Lines written for this test in WikiText-2-raw's style (leading space, spaced punctuation, " @-@ ", final newline),
# each of more than 50 characters, so each would pass data_prep.hub's MIN_CHARS filter.
PARAGRAPHS = [
    " The castle was built in the late 12th century by Hugh de Lacy , who held the lordship of Meath . It was extended "
    "several times over the next two hundred years , and by the 15th century it had a keep , a curtain wall with four "
    "towers and a large outer bailey . The castle was besieged in 1641 during the Irish Confederate Wars and was "
    "partly demolished by Parliamentarian forces in 1650 . \n",
    " The species is found in dry forests and scrubland from southern Mexico to northern Argentina . Adults are about "
    "30 cm ( 12 in ) long and have brown upperparts , a pale grey breast and a long , barred tail . They feed mainly "
    "on insects and small lizards , which they catch on the ground after watching from a low perch . \n",
    " In 1862 the regiment was sent to Virginia , where it took part in the Peninsula Campaign under General George B. "
    "McClellan . It fought at the Battle of Seven Pines and in the Seven Days Battles , losing nearly a third of its "
    "men . The regiment was later present at Antietam and Fredericksburg . \n",
    " The church has a nave of four bays , a chancel , a south porch and a west tower . The tower is in three stages , "
    "with diagonal buttresses , a west doorway and a three @-@ light window above it . Inside the church is a Norman "
    "font , a Jacobean pulpit and several memorials , the oldest dating from 1620 . \n",
]
HEADING = " = = = Early life and education in Bristol = = = \n"  # a heading longer than MIN_CHARS: kept by the filter
SHORT_LINE = " He was buried in the churchyard at Kirkby Lonsdale . \n"
SHORT_LINES = [
    HEADING,
    SHORT_LINE,
    " = = = 2007 – 10 : Return to the national team = = = \n",
    " The album was certified gold in Canada in 2004 . \n",
]
RUDE_LIKE = ' Critics called the sequel " a stupid , lazy and worthless mess " and the lead actor " an idiot " . \n'


def test_the_last_of_100_steps_is_an_ordinary_retain_batch():
    """Under the registry defaults (batch 4, 2 epochs, seed 0) and a ParaDetox-sized forget corpus, step 100 reads
    retain batch 99 of epoch 0: a full batch of 4, read by no other step; no step of the 100 wraps the retain index."""
    plan = resolve(Settings(goal="toxicity", method="rmu", data="demo", max_steps=100), read_config(prepare_smollm2()))
    assert (plan.batch_size, plan.epochs, plan.seed) == (4, 2, 0)
    forget = {"paradetox-toxic": [f"forget {i}" for i in range(19_744)]}
    for n in (400, 943, 2891, 4358):
        retain = [f"retain {i}" for i in range(n)]
        data = GoalData(Path("."), "toxicity", forget, retain, None, {}, {}, None, "letter", None, {})
        steps = schedule(data, plan)
        epoch, _, _, last = steps[-1]
        assert len(steps) == 100 and epoch == 0
        assert last == batches(retain, 4, plan.seed + 7919, 0)[99] and len(last) == 4
        assert len({tuple(s[3]) for s in steps}) == 100  # every step a fresh retain batch: no wrap, no repeat
    assert [len(b) for b in batches(list(range(10)), 4, 0, 0)] == [4, 4]  # the short tail batch is dropped


@pytest.fixture(scope="module")
def trained():
    """(run, originals) after the demo's whole RMU toxicity run, eager, registry defaults (40 steps, ~15 s)."""
    folder = prepare_smollm2()
    plan = resolve(Settings(goal="toxicity", method="rmu", data="demo", compile=False), read_config(folder))
    torch.manual_seed(plan.seed)
    data = load_goal_data(resolve_data_dir("demo", "toxicity"), "toxicity")
    model = load_model(folder, dtype=torch.float32, device="cpu", blocks=plan.loaded_blocks)
    u = random_directions(list(data.forget), model.config.hidden_size, plan.seed, "cpu")
    run = Run(plan, model, load_tokenizer(folder), u, None)
    state = start_state(plan, model)
    rows = [step(run, state, topic, f, r) for _, topic, f, r in schedule(data, plan)]
    assert len(rows) == 40 and max(row["retain_loss"] for row in rows) < 0.3  # measured 0.22: no spike in training
    return run, state.originals


def retain_taps(run: Run, originals: dict, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, h0, mask): the updated and the frozen model's tap layer on `texts`, as a training step reads them."""
    ids, mask = encode(run, texts)
    (tap,) = run.plan.taps
    with torch.no_grad():
        x = shared_prefix(run, ids, mask)
        return taps(run, x, mask)[tap], taps(run, x, mask, originals)[tap], mask


def test_the_attention_sink_is_not_what_moves(trained):
    """The first real position carries the sink's huge norm, yet its squared error is below the other positions';
    positions 1-15 (all a short text has) move about twice as much as the later ones."""
    h, h0, mask = retain_taps(*trained, PARAGRAPHS)
    first = mask.argmax(1)  # left padding: the first real position of each row
    rows = torch.arange(len(PARAGRAPHS))
    norms = h0.norm(dim=-1)
    assert norms[rows, first].min() > 5 * norms[mask.bool()].median()  # measured 630-640 against 115
    sq = (h - h0).pow(2).mean(-1)
    others = mask.bool().clone()
    others[rows, first] = False
    sink_mse, other_mse = sq[rows, first].mean().item(), sq[others].mean().item()
    assert sink_mse < other_mse  # measured 0.055 against 0.15
    assert sq[rows, first].sum() / sq[mask.bool()].sum() < 0.01  # measured 0.5%: the sink's share of eq. 3
    position = mask.cumsum(1) - 1  # 0 at the first real token
    early = sq[mask.bool() & (position >= 1) & (position < 16)].mean().item()
    late = sq[mask.bool() & (position >= 16)].mean().item()
    assert 1.5 < early / late < 4  # measured 0.26 against 0.12 (2.1x): a short text's eq. 3 is about twice a long one's


def test_one_forget_like_text_makes_the_spike(trained):
    """Three neutral paragraphs plus a fourth text: eq. 3 of the batch by that fourth text; and a batch of four short
    lines, whose tokens are all early positions."""

    def eq3(fourth: str) -> float:
        return rmu_retain_loss(*retain_taps(*trained, PARAGRAPHS[:3] + [fourth])).item()

    neutral, heading, short, rude = eq3(PARAGRAPHS[3]), eq3(HEADING), eq3(SHORT_LINE), eq3(RUDE_LIKE)
    assert 0.05 < neutral < 0.3  # measured 0.15: the level the training logs
    assert heading < 1.5 * neutral and short < 1.5 * neutral  # measured 1.28x and 1.19x
    assert rude > 10 * neutral  # measured 18.5x (2.78)
    only_short = rmu_retain_loss(*retain_taps(*trained, SHORT_LINES)).item()
    assert 3 * neutral < only_short < rude  # measured 4.9x (0.74): a jump too, but only when all four texts are short
    h, h0, mask = retain_taps(*trained, [RUDE_LIKE])
    steered = (h - h0).pow(2).mean(-1)[mask.bool()].max().item()
    assert steered > 50  # measured 132; a token steered all the way to c * u would give ~(550^2 + 110^2) / 576 = 546


def test_the_logged_worst_text_names_the_text_that_carries_the_jump(trained):
    """RMU's metrics rows log the retain text with the largest eq. 3 (retain_worst_text, its index in the step's retain
    batch): with the insult line third in a batch of neutral paragraphs, the objective names it."""
    run, originals = trained
    texts = PARAGRAPHS[:2] + [RUDE_LIKE] + PARAGRAPHS[3:4]
    h, h0, mask = retain_taps(run, originals, texts)
    (tap,) = run.plan.taps
    acts = Activations({tap: h}, mask, {tap: h}, {tap: h0}, mask)
    targets = Targets((tap,), torch.zeros(h.shape[-1]), "mean", steering=550.0)
    losses = OBJECTIVES["rmu", "toxicity"].losses(acts, targets, eager)
    per_text = losses.retain_per_text
    assert int(per_text.argmax()) == 2 and per_text[2] > 10 * per_text[[0, 1, 3]].max()
    real = mask.sum(1).float()
    assert (per_text * real).sum() / real.sum() == pytest.approx(losses.retain.item(), rel=1e-5)  # eq. 3 of the batch
