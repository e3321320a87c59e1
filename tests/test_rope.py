"""spice_fast.kernels.rope (C++ one-pass rotary embedding on float32 CPU tensors) against the torch
reference: values and gradients against fp64, head dims that are not a multiple of the vector width,
threads, the fallbacks."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_error_rule
from spice_fast.kernels import rope as rope_mod
from spice_fast.kernels._utils import cpu_ops_available
from spice_fast.kernels.rope import rope, rope_ref

needs_ext = pytest.mark.skipif(not cpu_ops_available(), reason="spice_fast._cpu_ops is not built")


def _angles(n, dim, gen):
    positions = torch.randint(0, 5000, (n,), generator=gen).double()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angles = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((angles, angles), dim=-1)
    return emb.cos(), emb.sin()


def _run(fn, x64, cos64, sin64, dy64, dtype):
    x = x64.to(dtype).clone().requires_grad_()
    y = fn(x, cos64.float(), sin64.float())
    y.backward(dy64.to(dtype))
    return y, x.grad


@needs_ext
@pytest.mark.parametrize(
    ("n", "heads", "dim"), [(1, 1, 2), (5, 3, 64), (37, 9, 64), (4, 2, 40), (3000, 9, 64)]
)
@pytest.mark.parametrize("threads", [1, 3])
def test_matches_fp64(n, heads, dim, threads, monkeypatch):
    monkeypatch.setattr(rope_mod.torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(n + dim)
    x = torch.randn(n, heads, dim, generator=gen, dtype=torch.float64)
    dy = torch.randn(n, heads, dim, generator=gen, dtype=torch.float64)
    cos, sin = _angles(n, dim, gen)
    fast = _run(rope, x, cos, sin, dy, torch.float32)
    ref32 = _run(rope_ref, x, cos, sin, dy, torch.float32)
    exact = _run(rope_ref, x, cos.float().double(), sin.float().double(), dy, torch.float64)
    for i, name in enumerate(("y", "grad x")):
        assert_error_rule(fast[i], ref32[i], exact[i], tiny=1e-6, name=f"{name} {(n, heads, dim)}")


@needs_ext
def test_fast_path_is_taken_and_saves_no_activation(monkeypatch):
    calls = []
    real = rope_mod._rotate
    monkeypatch.setattr(
        rope_mod, "_rotate", lambda x, c, s, backward: calls.append(backward) or real(x, c, s, backward)
    )
    x = torch.randn(4, 2, 8, requires_grad=True)
    cos, sin = torch.rand(4, 8), torch.rand(4, 8)
    y = rope(x, cos, sin)
    assert len(y.grad_fn.saved_tensors) == 2  # cos and sin only
    y.sum().backward()
    assert calls == [False, True]


def test_fallbacks_and_errors(monkeypatch):
    monkeypatch.setattr(rope_mod, "_rotate", lambda *a: pytest.fail("fast path taken"))
    x, cos, sin = torch.randn(3, 2, 8), torch.rand(3, 8), torch.rand(3, 8)
    torch.testing.assert_close(rope(x.double(), cos, sin), rope_ref(x.double(), cos, sin))
    rope(x.bfloat16(), cos, sin)
    rope(x, cos, sin, backend="torch")
    monkeypatch.setenv("SPICE_FAST_ROPE", "torch")
    rope(x, cos, sin)
    with pytest.raises(ValueError, match="rope takes"):
        rope(x, cos[:2], sin[:2])
    with pytest.raises(ValueError, match="rope takes"):
        rope(torch.randn(3, 2, 7), torch.rand(3, 7), torch.rand(3, 7))
    with pytest.raises(ValueError, match="'fast'"):
        rope(x, cos, sin, backend="fast")
