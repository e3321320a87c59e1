"""spice_fast.kernels.swiglu (C++ one-pass SwiGLU on float32 CPU tensors) against F.silu(g) * u:
values, gradients, extreme inputs, odd sizes, the fallbacks."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_error_rule
from spice_fast.kernels import swiglu as swiglu_mod
from spice_fast.kernels._utils import cpu_ops_available
from spice_fast.kernels.swiglu import swiglu, swiglu_ref

needs_ext = pytest.mark.skipif(not cpu_ops_available(), reason="spice_fast._cpu_ops is not built")


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    """Test shapes take the C++ path whatever their size (test_size_threshold checks the limit)."""
    monkeypatch.setattr(swiglu_mod, "MIN_NUMEL", 0)


def _inputs(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(shape, generator=gen, dtype=torch.float64) * 4
    u = torch.randn(shape, generator=gen, dtype=torch.float64)
    flat = g.view(-1)
    flat[: min(6, flat.numel())] = torch.tensor([100.0, -100.0, 88.5, -88.5, 0.0, -1e-30])[
        : min(6, flat.numel())
    ]
    return g, u, torch.randn(shape, generator=gen, dtype=torch.float64)


@needs_ext
@pytest.mark.parametrize("shape", [(1,), (15,), (17,), (7, 37), (3, 1000 + 37), (257, 1536)])
@pytest.mark.parametrize("threads", [1, 3])
def test_matches_fp64(shape, threads, monkeypatch):
    monkeypatch.setattr(swiglu_mod.torch, "get_num_threads", lambda: threads)
    g, u, dh = _inputs(shape, sum(shape))
    outs = {}
    for name, fn, dtype in (("fast", swiglu, torch.float32), ("torch", swiglu_ref, torch.float32),
                            ("exact", swiglu_ref, torch.float64)):  # fmt: skip
        gg, uu = g.to(dtype).requires_grad_(), u.to(dtype).requires_grad_()
        h = fn(gg, uu)
        h.backward(dh.to(dtype))
        outs[name] = (h, gg.grad, uu.grad)
    for i, what in enumerate(("h", "grad gate", "grad up")):
        assert_error_rule(
            outs["fast"][i], outs["torch"][i], outs["exact"][i], tiny=1e-6, name=f"{what} {shape}"
        )


@needs_ext
def test_fast_path_is_taken_and_saves_two_tensors(monkeypatch):
    calls = []
    real = swiglu_mod._forward
    monkeypatch.setattr(swiglu_mod, "_forward", lambda g, u: calls.append(g.shape) or real(g, u))
    g, u = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    h = swiglu(g, u)
    assert calls == [(4, 8)]
    assert len(h.grad_fn.saved_tensors) == 2


@needs_ext
def test_non_contiguous_inputs():
    g = torch.randn(6, 40)[:, ::2]
    u = torch.randn(20, 6).t()
    torch.testing.assert_close(swiglu(g, u), swiglu_ref(g, u), rtol=1e-6, atol=1e-6)


def test_fallbacks_and_errors(monkeypatch):
    monkeypatch.setattr(swiglu_mod, "_forward", lambda g, u: pytest.fail("fast path taken"))
    g = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(swiglu(g, g), swiglu_ref(g, g))
    swiglu(g.float(), g.float(), backend="torch")
    monkeypatch.setenv("SPICE_FAST_SWIGLU", "torch")
    swiglu(g.float(), g.float())
    with pytest.raises(ValueError, match="same shape"):
        swiglu(torch.randn(3, 5), torch.randn(3, 4))
    with pytest.raises(ValueError, match="'fast'"):
        swiglu(torch.randn(3, 5), torch.randn(3, 5), backend="fast")


@needs_ext
def test_size_threshold(monkeypatch):
    monkeypatch.setattr(swiglu_mod, "MIN_NUMEL", 100)
    calls = []
    real = swiglu_mod._forward
    monkeypatch.setattr(swiglu_mod, "_forward", lambda g, u: calls.append(g.numel()) or real(g, u))
    for n in (99, 100):
        swiglu(torch.randn(n), torch.randn(n))
    swiglu(torch.randn(99), torch.randn(99), backend="cpp")  # a forced backend ignores the limit
    assert calls == [100, 99]
