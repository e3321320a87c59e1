"""Dense layers (``y = x @ weight.T + bias``) with a faster CPU GEMM than torch's default.

* ``linear_ref``: ``torch.nn.functional.linear``, the definition of correct.
* ``linear``: the same contract. On float32 CPU tensors with a large weight it runs the forward
  product (and, for large batches, the input gradient) through oneDNN's inner product
  (``torch.ops.mkldnn._linear_pointwise``, the op torch's inductor uses for CPU linears), straight on
  the parameter tensor: no packed or second copy of the weights, so the sampler and the trainer still
  read one set of parameters. The weight gradient ``g.T @ x`` stays on torch's GEMM, which is as fast
  or faster for that shape. Everywhere else (CUDA, bf16/fp16, a build without oneDNN, DTensor
  weights, empty inputs, weights under ``MIN_WEIGHT_NUMEL`` elements) it is ``linear_ref``.

Why: torch's CPU ``mm`` calls MKL's sgemm, which takes its generic code path on AMD processors. On
the 2-core AMD EPYC (Zen 4) this project is developed on, oneDNN computes the LM head 2.1-2.2x and
the MLP projections 1.1-1.25x faster, in decode steps and in training; ``benches/bench_linear.py``
measures both in one run, shape by shape.

Switch: ``backend="onednn"|"torch"`` per call, or ``SPICE_FAST_LINEAR=auto|onednn|torch`` (``auto``,
the default, takes oneDNN where it applies). tests/test_linear.py compares values and gradients with
``linear_ref``.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ._utils import PLAIN_TENSORS

log = logging.getLogger(__name__)

BACKENDS = ("auto", "onednn", "torch")


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def onednn_available() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


# Measured with benches/bench_linear.py on the 2-core Zen 4: oneDNN's per-call cost outweighs its
# faster kernel for small weights (the 576x192 K/V and 576x576 Q/O projections run 0.7-1.0x torch's
# speed through it), and its input-gradient product only wins on large batches.
MIN_WEIGHT_NUMEL = 1 << 19  # forward: weights of at least this many elements (MLP, LM head)
MIN_DGRAD_ROWS = 1024  # backward: input gradients of at least this many rows (and a large weight)


def _applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.dim() == 2
        and type(x) in PLAIN_TENSORS
        and type(weight) in PLAIN_TENSORS
        and (bias is None or (type(bias) in PLAIN_TENSORS and bias.dtype == torch.float32))
        and x.numel() > 0
        and x.shape[-1] == weight.shape[1]
        and weight.numel() >= MIN_WEIGHT_NUMEL
    )


def pick_linear_backend(backend: str | None) -> str:
    choice = backend if backend is not None else os.environ.get("SPICE_FAST_LINEAR", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or SPICE_FAST_LINEAR), got {choice!r}")
    if choice == "torch":
        return "torch"
    if onednn_available():
        return "onednn"
    if choice == "onednn":
        raise ValueError("backend='onednn' was forced but this torch build has no oneDNN (mkldnn)")
    _warn_once()
    return "torch"


_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning("oneDNN is not available in this torch build: CPU linears use torch's GEMM")


def _onednn_mm_t(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``a @ b.T + bias`` for a 2-D float32 ``a`` [M, K] and ``b`` [N, K] (strides honoured)."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias):  # x2 [M, K] contiguous
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        return _onednn_mm_t(x2, weight, bias)

    @staticmethod
    def backward(ctx, grad):  # grad [M, N]
        x2, weight = ctx.saved_tensors
        grad = grad.contiguous()
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = None  # grad @ weight: [M, K]
        if need_x:
            grad_x = _onednn_mm_t(grad, weight.t(), None) if len(grad) >= MIN_DGRAD_ROWS else grad.mm(weight)
        grad_w = grad.t().mm(x2) if need_w else None  # [N, K]
        grad_b = grad.sum(0) if need_b and ctx.has_bias else None
        return grad_x, grad_w, grad_b


def linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    backend: str | None = None,
) -> torch.Tensor:  # [..., N]
    """``F.linear(x, weight, bias)``, through oneDNN on float32 CPU tensors (see the module docstring)."""
    if not _applies(x, weight, bias) or pick_linear_backend(backend) == "torch":
        return linear_ref(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        out = _OneDNNLinear.apply(x2, w, bias)
    else:
        out = _onednn_mm_t(x2, w, bias)
    return out.view(*lead, weight.shape[0])
