"""Fused loss kernels: a loss function of ref.losses run through torch.compile, with an eager fallback.

The training loop fuses eq. 2-5, which read whole [B, T, D] taps (eq. 4 and 5: 5-9x faster than eager at
4 x 512 x 4096, `make bench`). It runs eq. 6 eager: it reads one [B, D] vector per layer, so both versions take
~0.5 ms of per-op overhead (measured 1.00x in fp32, 0.78x in bf16), which does not repay the ~5 s compilation.

`fused(fn)` is the compiled version, `eager(fn)` is fn itself (`--no-compile`): the objectives take one of the two.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)
_fused: dict[Callable, Fused] = {}  # fn -> its compiled version, one per function for the whole process


def eager(fn: F) -> F:
    """fn unchanged: what the objectives use with --no-compile."""
    return fn


class Fused:
    """A loss function run through torch.compile; `kernel` is None until the first call, then the compiled function
    (or `fn` itself once compilation failed)."""

    def __init__(self, fn: Callable):
        self.fn, self.kernel = fn, None
        self.__name__, self.__doc__ = f"fused_{fn.__name__}", fn.__doc__

    def __call__(self, *args, **kwargs):
        if self.kernel is None:
            self.kernel = torch.compile(self.fn, dynamic=True)
        try:
            return self.kernel(*args, **kwargs)
        except Exception as err:
            if self.kernel is self.fn:
                raise
            out = self.fn(*args, **kwargs)  # raises again if the input is bad: not a compilation failure
            why = f"{type(err).__name__}: {str(err)[:200]}"
            warnings.warn(f"torch.compile of {self.fn.__name__} failed ({why}); running it eager", stacklevel=2)
            self.kernel = self.fn
            return out


def fused(fn: F) -> F:
    """`fn` through torch.compile, built lazily at the first call and cached per function (one `Fused` each).

    dynamic=True: one compilation serves every batch size and sequence length (T varies from batch to batch; the
    default would compile twice, and each compilation costs ~10-30 s on CPU). If compilation fails (no C++
    compiler, unsupported backend...) the function runs eager from then on, after one warning. An error that eager
    raises too (bad input) is re-raised and keeps compilation on. A failure that shows only when the backward graph
    is compiled (at the first .backward()) is not caught here: run with --no-compile if that happens.
    """
    if fn not in _fused:
        _fused[fn] = Fused(fn)
    return _fused[fn]
