"""Shared test helpers: one ``assert_close`` that reports max/mean error and the first mismatches,
and the STYLE.md error rule (kernel error vs an fp64 reference at most twice PyTorch's own error)."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float = 0.0, name: str = ""
):
    """Elementwise |actual - expected| <= atol + rtol * |expected|, with a readable failure."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        raise AssertionError(
            f"{name}: NaN pattern differs ({int(torch.isnan(a).sum())} vs {int(torch.isnan(e).sum())})"
        )
    finite = ~torch.isnan(e)
    err = (a - e).abs().where(finite, torch.zeros_like(a))
    bad = err > atol + rtol * e.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off; max err {err.max().item():.3e}, "
            f"mean err {err.mean().item():.3e}, atol {atol:.1e}, rtol {rtol:.1e}; first at {idx}: "
            f"got {[a[tuple(i)].item() for i in idx]}, expected {[e[tuple(i)].item() for i in idx]}"
        )


def max_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.detach().double().cpu() - reference.detach().double().cpu()).abs().max().item()


def assert_error_rule(
    kernel: torch.Tensor,
    torch_same_precision: torch.Tensor,
    reference_fp64: torch.Tensor,
    *,
    tiny: float = 1e-6,
    name: str = "",
    factor: float = 2.0,
):
    """STYLE.md: err(kernel vs fp64) <= 2 * err(PyTorch at the kernel's precision vs fp64) + tiny.
    ``factor`` replaces the 2 only where a test says why."""
    k_err, t_err = max_err(kernel, reference_fp64), max_err(torch_same_precision, reference_fp64)
    if not k_err <= factor * t_err + tiny:
        raise AssertionError(
            f"{name}: kernel error {k_err:.3e} > {factor:g} x torch error {t_err:.3e} + {tiny:.1e}"
        )


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) any op creates, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                # bytes: the Triton interpreter copies kernel arguments as raw byte storages
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out
