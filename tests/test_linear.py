"""spice_fast.kernels.linear (the small-row C++ GEMM and oneDNN on float32 CPU tensors) against
F.linear: values, gradients, the fallbacks, the size rules and the switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_error_rule
from spice_fast.kernels import linear as linear_mod
from spice_fast.kernels.linear import linear, linear_ref, onednn_available, small_gemm_available

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN")
needs_small = pytest.mark.skipif(
    not small_gemm_available(), reason="spice_fast._cpu_ops not built or no AVX-512 on this CPU"
)


@pytest.fixture(autouse=True)
def any_size(monkeypatch):
    """Test shapes take the oneDNN path whatever their size (test_size_thresholds checks the limits)."""
    monkeypatch.setattr(linear_mod, "MIN_WEIGHT_NUMEL", 0)
    monkeypatch.setattr(linear_mod, "MIN_DGRAD_ROWS", 0)


def assert_within_gemm_bound(got, a64, b64, exact, name):
    """|got - exact| <= n u sum_k |a_ik b_kj| + tiny (u = 2^-24): the rounding bound of a float32 dot
    product of length n in any summation order, so it holds for oneDNN's blocking and MKL's alike,
    while one missing or wrong term (of size |a_ik b_kj|) breaks it."""
    n = a64.shape[-1]
    bound = n * 2.0**-24 * (a64.abs() @ b64.abs()) + 1e-7
    err = (got.double() - exact).abs()
    bad = err > bound
    assert not bad.any(), f"{name}: {int(bad.sum())} elements past the bound; max err {err.max():.3e}"


def _calls(monkeypatch, name: str = "_onednn_mm_t") -> list:
    """Counts the oneDNN products (or the small-row GEMM's with ``name="_small_gemm"``), so a test
    fails if the fast path silently stops being taken."""
    calls = []
    real = getattr(linear_mod, name)

    def counted(a, b, bias):
        calls.append(tuple(a.shape))
        return real(a, b, bias)

    monkeypatch.setattr(linear_mod, name, counted)
    return calls


@pytest.mark.parametrize(
    ("rows", "k", "n"),
    [(r, k, n) for r in (1, 5, 37, 300) for k, n in ((64, 96), (123, 1000 + 37))]
    + [(r, 576, 49152 + 1) for r in (1, 5)]  # a vocabulary-sized output
    + [(r, 15, 7) for r in (1, 6)],  # K under one vector, N under one tile
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("backend", ["onednn", "cpp"])
def test_forward_matches_fp64(monkeypatch, rows, k, n, bias, backend):
    available = onednn_available() if backend == "onednn" else small_gemm_available()
    if not available:
        pytest.skip(f"backend {backend} is not available here")
    gen = torch.Generator().manual_seed(rows * 7 + k)
    x = torch.randn(rows, k, generator=gen, dtype=torch.float64)
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * k**-0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64) if bias else None
    calls = _calls(monkeypatch, "_onednn_mm_t" if backend == "onednn" else "_small_gemm")
    got = linear(x.float(), w.float(), None if b is None else b.float(), backend=backend)
    assert calls == [(rows, k)]
    xb = torch.cat([x, torch.ones(rows, 1, dtype=x.dtype)], 1) if bias else x  # the bias as one more term
    wb = torch.cat([w, b[:, None]], 1) if bias else w
    assert_within_gemm_bound(got, xb, wb.T, F.linear(x, w, b), name=f"linear {rows}x{k}x{n}")


@needs_onednn
@needs_small
@pytest.mark.parametrize("kernel", ["auto", "dot", "broadcast"])
@pytest.mark.parametrize("rows", [1, 8, 9, 10, 16, 17, 23, 24, 32, 33, 44, 70])
def test_small_gemm_kernels_match_fp64(rows, kernel):
    """Both small-row kernels at every row count class: the dot-product tiles (1-9, 17-23 under auto), the
    broadcast kernel with one vector of rows (9-16 forced, 10-16 under auto) and two (17-32), and blocks
    of 32 after that; K and
    N off the vector and tile widths; a row stride past the row length; a bias; nothing written
    outside [rows, N]."""
    k, n = 70, 2 * 96 + 24 + 5  # two column chunks, a unit, and a tail under one tile
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k + 3, generator=gen, dtype=torch.float64)[:, :k]
    w = torch.randn(n, k, generator=gen, dtype=torch.float64) * k**-0.5
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    out = torch.full((rows + 1, n + 3), float("nan"))
    y = out[:rows, :n]
    xf, wf, bf = x.float(), w.float(), b.float()
    linear_mod.cpu_ops().small_gemm(
        xf.data_ptr(), xf.stride(0), wf.data_ptr(), k, bf.data_ptr(), y.data_ptr(), y.stride(0), rows, n, k,
        2, linear_mod.SMALL_GEMM_KERNELS[kernel],
    )  # fmt: skip
    assert out[rows:].isnan().all() and out[:, n:].isnan().all(), "wrote outside y"
    xb = torch.cat([x, torch.ones(rows, 1, dtype=x.dtype)], 1)
    wb = torch.cat([w, b[:, None]], 1)
    assert_within_gemm_bound(y, xb, wb.T, F.linear(x, w, b), name=f"{kernel} {rows} rows")


def test_small_gemm_kernel_choice_is_checked():
    if not small_gemm_available():
        pytest.skip("spice_fast._cpu_ops not built or no AVX-512 on this CPU")
    x, w, y = torch.ones(2, 4), torch.ones(3, 4), torch.empty(2, 3)
    with pytest.raises(ValueError, match="kernel must be 0"):
        linear_mod.cpu_ops().small_gemm(x.data_ptr(), 4, w.data_ptr(), 4, 0, y.data_ptr(), 3, 2, 3, 4, 1, 3)


@pytest.mark.parametrize("bias", [False, True])
def test_gradients_match_fp64(monkeypatch, bias):
    gen = torch.Generator().manual_seed(3)
    x64 = torch.randn(2, 19, 123, generator=gen, dtype=torch.float64)  # leading dims are flattened
    w64 = torch.randn(77, 123, generator=gen, dtype=torch.float64) * 0.1
    b64 = torch.randn(77, generator=gen, dtype=torch.float64) if bias else None
    grad = torch.randn(2, 19, 77, generator=gen, dtype=torch.float64)

    def grads(fn, dtype):
        x, w = x64.to(dtype).clone().requires_grad_(), w64.to(dtype).clone().requires_grad_()
        b = None if b64 is None else b64.to(dtype).clone().requires_grad_()
        fn(x, w, b).backward(grad.to(dtype))
        return [t.grad for t in (x, w, b) if t is not None]

    calls = _calls(monkeypatch)
    fast = grads(linear, torch.float32)
    assert calls == [(38, 123), (38, 77)]  # the forward and the input gradient
    exact = grads(linear_ref, torch.float64)
    g2, x2 = grad.reshape(-1, 77), x64.reshape(-1, 123)
    assert_within_gemm_bound(fast[0].reshape(-1, 123), g2, w64, exact[0].reshape(-1, 123), name="grad x")
    assert_within_gemm_bound(fast[1], g2.T, x2, exact[1], name="grad weight")
    if bias:
        assert_error_rule(fast[2], grads(linear_ref, torch.float32)[2], exact[2], name="grad bias")


@needs_onednn
def test_no_grad_and_frozen_weight(monkeypatch):
    x, w = torch.randn(4, 32), torch.randn(8, 32, requires_grad=True)
    calls = _calls(monkeypatch)
    with torch.no_grad():
        out = linear(x, w, backend="onednn")
    assert not out.requires_grad and calls == [(4, 32)]
    x.requires_grad_()
    w.requires_grad_(False)
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, 32))


@needs_onednn
def test_non_contiguous_inputs(monkeypatch):
    base = torch.randn(10, 2 * 48)
    x = base[:, ::2]  # stride 2
    w = torch.randn(48, 30).t()  # [30, 48] transposed view
    _calls(monkeypatch)
    torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_fallbacks_take_the_reference(monkeypatch):
    calls = _calls(monkeypatch)
    w = torch.randn(8, 16)
    linear(torch.randn(3, 16, dtype=torch.float64), w.double())  # not float32
    linear(torch.randn(3, 16).bfloat16(), w.bfloat16())
    linear(torch.randn(0, 16), w)  # empty
    linear(torch.randn(3, 16), w, backend="torch")
    monkeypatch.setenv("SPICE_FAST_LINEAR", "torch")
    linear(torch.randn(3, 16), w)
    assert calls == []


def test_bad_backend_is_named():
    with pytest.raises(ValueError, match="'fast'"):
        linear(torch.randn(2, 4), torch.randn(3, 4), backend="fast")


def test_shape_errors_come_from_torch():
    with pytest.raises(RuntimeError):
        linear(torch.randn(2, 5), torch.randn(3, 4))


@needs_onednn
def test_size_thresholds(monkeypatch):
    monkeypatch.setattr(linear_mod, "MIN_WEIGHT_NUMEL", 1000)
    monkeypatch.setattr(linear_mod, "MIN_DGRAD_ROWS", 10)
    calls = _calls(monkeypatch)
    linear(torch.randn(3, 16), torch.randn(62, 16))  # 992 elements: torch
    assert calls == []
    for rows in (9, 10):  # the input gradient through oneDNN from 10 rows on
        x = torch.randn(rows, 16, requires_grad=True)
        linear(x, torch.randn(63, 16)).sum().backward()
    assert calls == [(9, 16), (10, 16), (10, 63)]


@needs_small
def test_small_row_gemm_rules(monkeypatch):
    """auto: the small-row GEMM for calls without autograd up to SMALL_GEMM_MAX_ROWS rows and under
    SMALL_GEMM_MAX_WEIGHT_NUMEL weight elements; oneDNN or torch otherwise; never with autograd."""
    monkeypatch.setattr(linear_mod, "SMALL_GEMM_MAX_ROWS", 4)
    monkeypatch.setattr(linear_mod, "SMALL_GEMM_MAX_WEIGHT_NUMEL", 1000)
    small, onednn = _calls(monkeypatch, "_small_gemm"), _calls(monkeypatch)
    w = torch.randn(62, 16, requires_grad=True)  # 992 elements
    with torch.inference_mode():
        linear(torch.randn(4, 16), w)  # small
        linear(torch.randn(2, 3, 16), w)  # leading dims flattened: 6 rows, past the limit
        linear(torch.randn(2, 16), torch.randn(63, 16))  # 1008 elements: past the limit
        linear(torch.randn(2, 16), torch.randn(63, 16), backend="cpp")  # forced: any size
        linear(torch.randn(2, 16), w, backend="onednn")  # never the small GEMM
    assert small == [(4, 16), (2, 16)]
    assert onednn == [(6, 16), (2, 16), (2, 16)]
    x = torch.randn(3, 16, requires_grad=True)
    linear(x, w, backend="cpp").sum().backward()  # autograd: never the small GEMM
    assert small == [(4, 16), (2, 16)] and x.grad is not None


@needs_small
def test_small_row_gemm_strides_and_threads():
    """Rows at a stride (a slice of a wider tensor), a transposed weight (copied), one or two threads."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(9, 1000, generator=gen)
    x = base[:, 10:310]  # row stride 1000
    w_t = torch.randn(300, 601, generator=gen)  # used as its transpose [601, 300]
    b = torch.randn(601, generator=gen)  # 1.6M multiply-adds: split over two threads
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got = linear(x, w_t.t(), b, backend="cpp")
            torch.testing.assert_close(got, F.linear(x, w_t.t(), b), rtol=1e-4, atol=1e-4)  # terms ~1
    finally:
        torch.set_num_threads(threads)


def test_forced_cpp_without_the_kernel_is_an_error(monkeypatch):
    monkeypatch.setattr(linear_mod, "_small_gemm_ok", [False])
    with pytest.raises(ValueError, match="'cpp' was forced"):
        linear(torch.randn(2, 4), torch.randn(3, 4), backend="cpp")
