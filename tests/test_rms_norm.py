"""spice_fast.kernels.rms_norm (C++ one-pass RMSNorm on float32 CPU tensors) against the torch
reference: values and gradients against fp64, odd sizes, 3-D inputs (Qwen3's per-head norms), threads,
a deterministic weight gradient, the fallbacks."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_error_rule
from spice_fast.kernels import rms_norm as rms_mod
from spice_fast.kernels._utils import cpu_ops_available
from spice_fast.kernels.rms_norm import rms_norm, rms_norm_ref

needs_ext = pytest.mark.skipif(not cpu_ops_available(), reason="spice_fast._cpu_ops is not built")


def _run(fn, x64, w64, dy64, dtype, eps=1e-5):
    x, w = x64.to(dtype).clone().requires_grad_(), w64.to(dtype).clone().requires_grad_()
    y = fn(x, w, eps)
    y.backward(dy64.to(dtype))
    return y, x.grad, w.grad


@needs_ext
@pytest.mark.parametrize("shape", [(1, 16), (7, 37), (300, 576), (5, 9, 64), (3, 1000 + 37)])
@pytest.mark.parametrize("threads", [1, 3])
def test_matches_fp64(shape, threads, monkeypatch):
    monkeypatch.setattr(rms_mod.torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    x.view(-1, shape[-1])[0] *= 1e6  # one row of large values
    w = torch.randn(shape[-1], generator=gen, dtype=torch.float64)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64)
    fast = _run(rms_norm, x, w, dy, torch.float32)
    ref32 = _run(rms_norm_ref, x, w, dy, torch.float32)
    exact = _run(rms_norm_ref, x, w, dy, torch.float64)
    for i, name in enumerate(("y", "grad x", "grad weight")):
        assert_error_rule(fast[i], ref32[i], exact[i], tiny=1e-5, name=f"{name} {shape}")


@needs_ext
def test_threaded_weight_gradient_is_deterministic(monkeypatch):
    monkeypatch.setattr(rms_mod.torch, "get_num_threads", lambda: 3)
    gen = torch.Generator().manual_seed(1)
    x, w, dy = torch.randn(999, 300, generator=gen), torch.randn(300, generator=gen), torch.randn(999, 300)
    grads = [_run(rms_norm, x, w, dy, torch.float32)[2] for _ in range(4)]
    assert all(torch.equal(grads[0], g) for g in grads[1:])


@needs_ext
def test_fast_path_is_taken(monkeypatch):
    calls = []
    real = rms_mod._forward
    monkeypatch.setattr(rms_mod, "_forward", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.no_grad():
        rms_norm(torch.randn(2, 3, 8), torch.ones(8), 1e-6)
    rms_norm(torch.randn(4, 8, requires_grad=True), torch.ones(8), 1e-6)
    assert calls == [(6, 8), (4, 8)]


def test_fallbacks_and_errors(monkeypatch):
    monkeypatch.setattr(rms_mod, "_forward", lambda *a: pytest.fail("fast path taken"))
    x = torch.randn(3, 8)
    torch.testing.assert_close(
        rms_norm(x.double(), torch.ones(8).double(), 1e-6),
        rms_norm_ref(x.double(), torch.ones(8).double(), 1e-6),
    )
    rms_norm(x.bfloat16(), torch.ones(8).bfloat16(), 1e-6)
    rms_norm(x, torch.ones(8), 1e-6, backend="torch")
    monkeypatch.setenv("SPICE_FAST_RMS_NORM", "torch")
    rms_norm(x, torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="'fast'"):
        rms_norm(x, torch.ones(8), 1e-6, backend="fast")
