"""ref.run.fused: the compiled losses against eager, the fallback when compilation fails."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ref import losses
from ref.run.fused import eager, fused
from tests.test_losses import e, padded_batch


def _random_case(b: int, t: int, d: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, d, generator=g).requires_grad_(True)
    h0 = torch.randn(b, t, d, generator=g)
    u = F.normalize(torch.rand(d, generator=g), dim=0)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[0, : t // 4] = False  # some left padding
    mask[-1, -3:] = False  # some right padding
    with torch.no_grad():
        h[~mask] = 1e4  # garbage in padding
    return h, h0, u, mask


CASES = {
    "rmu_forget": (losses.rmu_forget_loss, lambda h, h0, u, m: (h, u, 6.5, m)),
    "rmu_retain": (losses.rmu_retain_loss, lambda h, h0, u, m: (h, h0, m)),
    "cosine_forget": (losses.cosine_forget_loss, lambda h, h0, u, m: (h, u, m)),
    "cosine_retain": (losses.cosine_retain_loss, lambda h, h0, u, m: (h, h0, m)),
    "probe_projection": (
        lambda h, w: losses.probe_projection_loss([h[:, 5 + i] for i in range(w.shape[0])], w)[0],
        lambda h, h0, u, m: (h, torch.stack([u, F.normalize(h0[0, 0], dim=0), -u])),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_matches_eager_value_and_gradient(name):
    """Each function is compiled once (dynamic=True) and then serves a second shape without recompiling.

    Tolerance: the fused kernels reorder fp32 sums of ~2k terms; the expected relative difference is a few
    1e-7, so rtol 1e-5 (atol 1e-8 for the tiny per-element gradients, ~1e-4 each) leaves margin while a real
    mistake (a missing mask, a wrong mean) would be off by percents.
    """
    fn, make_args = CASES[name]
    cfn = fused(fn)
    assert fused(fn) is cfn  # cached
    for shape, seed in [((2, 16, 64), 0), ((3, 20, 64), 1)]:
        h, h0, u, mask = _random_case(*shape, seed)
        args = make_args(h, h0, u, mask)
        # a fallback to eager (or a recompilation for the second shape) would make this test meaningless
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch._dynamo.config.patch(error_on_recompile=shape[1] == 20):
                value_c = cfn(*args)
        assert not [w for w in caught if "torch.compile of" in str(w.message)]
        (grad_c,) = torch.autograd.grad(value_c, h)
        value_e = fn(*args)
        (grad_e,) = torch.autograd.grad(value_e, h)
        torch.testing.assert_close(value_c, value_e, rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(grad_c, grad_e, rtol=1e-5, atol=1e-8)
        assert torch.isfinite(grad_c).all()
    assert cfn.kernel is not fn  # really compiled, not fallen back


def test_compile_failure_falls_back_with_one_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fn = lambda h, u, m: losses.cosine_forget_loss(h, u, m)  # a fresh function: fresh cache entry
    cfn = fused(fn)
    h, u, mask = padded_batch()
    eager = fn(h, u, mask).item()
    with pytest.warns(UserWarning, match="torch.compile of .* failed"):
        assert cfn(h, u, mask).item() == eager
    with warnings.catch_warnings(record=True) as caught:  # one warning only: later calls run eager quietly
        warnings.simplefilter("always")
        assert cfn(h, u, mask).item() == eager
    assert not [w for w in caught if "torch.compile of" in str(w.message)]


def test_bad_input_to_compiled_raises_and_keeps_compilation(monkeypatch):
    calls = []

    def fake_compile(fn, **kwargs):
        def run(*args, **kw):
            calls.append(1)
            return fn(*args, **kw)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    fn = lambda h, u, m: losses.cosine_forget_loss(h, u, m)
    cfn = fused(fn)
    with pytest.raises(ValueError, match="mask"):
        cfn(torch.zeros(2, 3, 4), e(0), torch.ones(2, 5))
    h, u, mask = padded_batch()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfn(h, u, mask)
    assert not [w for w in caught if "torch.compile of" in str(w.message)]
    assert len(calls) == 2  # both calls went through the "compiled" function
    assert eager(fn) is fn  # --no-compile: the function itself
