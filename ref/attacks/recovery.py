"""How much of the unlearning effect an attack undoes, per metric (ref.attack's figures).

With b, u the base and unlearned model's value before the attack and b', u' after it (on the same questions):

    recovery     = (u' - u) / (b - u)                      0: the attack undid nothing, 1: all of the effect
    base shift   = (b' - b) / (b - u)                      what the attack does to the base, in the same units
    net recovery = recovery - max(0, base shift)

Relearning on forget texts, a soft prompt or few-shot examples also raise the base model (Feng et al. 2025: a
relearning evaluation re-teaches what it measures), so only what the attack brings back beyond its gain on the base
counts as recovery. A negative shift (an attack that damages the base, such as 4-bit quantization of a small model)
subtracts nothing. The run's robustness figure is the worst case over its attacks: the largest net recovery of U.
"""

from __future__ import annotations


def recovery(base: dict, unlearned: dict, attacked: dict) -> dict[str, float | None]:
    """(attacked - unlearned) / (base - unlearned) per metric of `base`; None where unlearning changed nothing (or
    a value is missing)."""
    out = {}
    for k, b in base.items():
        u, a = unlearned.get(k), attacked.get(k)
        out[k] = None if None in (b, u, a) or b == u else (a - u) / (b - u)
    return out


def net_recovery(base: dict, unlearned: dict, attacked_base: dict, attacked: dict) -> dict[str, float | None]:
    """recovery - max(0, base shift) per metric of `base`, the base shift = (attacked_base - base) / (base -
    unlearned); None where the recovery or the attacked base value is missing."""
    out = {}
    for k, plain in recovery(base, unlearned, attacked).items():
        moved = attacked_base.get(k)
        out[k] = (
            None if plain is None or moved is None else plain - max(0.0, (moved - base[k]) / (base[k] - unlearned[k]))
        )
    return out


def gain(before: dict, after: dict) -> dict[str, float | None]:
    """after - before per metric of `before` (None where either is missing)."""
    return {k: None if v is None or after.get(k) is None else after[k] - v for k, v in before.items()}


def worst_case(attacks: dict[str, dict[str, dict]], metric: str = "U") -> dict | None:
    """The attack setting with the largest net recovery of `metric` ({attack: {setting: result with recovery and
    net_recovery}}), as {attack, setting, net_recovery, recovery}; None when no setting has one."""
    cases = [
        dict(attack=name, setting=label, net_recovery=r["net_recovery"][metric], recovery=r["recovery"][metric])
        for name, results in attacks.items()
        for label, r in results.items()
        if r["net_recovery"][metric] is not None
    ]
    return max(cases, key=lambda c: c["net_recovery"], default=None)
