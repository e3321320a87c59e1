"""Dense layers (``y = x @ weight.T + bias``) with faster CPU GEMMs than torch's default.

* ``linear_ref``: ``torch.nn.functional.linear``, the definition of correct.
* ``linear``: the same contract. On float32 CPU tensors it picks, straight on the parameter tensor
  (no packed or second copy of the weights, so the sampler and the trainer still read one set of
  parameters):

  - calls without autograd on at most ``SMALL_GEMM_MAX_ROWS`` rows (the sampler's decode steps) and
    weights under ``SMALL_GEMM_MAX_WEIGHT_NUMEL`` elements: the C++ small-row GEMM of
    ``csrc/ops/small_gemm.cpp`` (``spice_fast._cpu_ops``), which streams the weight once on torch's
    OpenMP threads: dot products of register tiles for few rows, and for 10-16 and 24-32 rows each
    weight value broadcast against the rows held transposed in vectors (no horizontal sums; 1.1-1.6x
    the tiles there); on CPUs with AVX-512 only;
  - weights of at least ``MIN_WEIGHT_NUMEL`` elements otherwise: oneDNN's inner product
    (``torch.ops.mkldnn._linear_pointwise``, the op torch's inductor uses for CPU linears) for the
    forward product and, for large batches, the input gradient. The weight gradient ``g.T @ x`` stays
    on torch's GEMM, which is as fast or faster for that shape.

  Everywhere else (CUDA, bf16/fp16, DTensor weights, empty inputs, small weights in training, a
  build without oneDNN or the extension) it is ``linear_ref``.

Why: torch's CPU ``mm`` calls MKL's sgemm, which takes its generic code path on AMD processors, and
a general GEMM packs and blocks for many rows. On the 2-core AMD EPYC (Zen 4) this project is
developed on, oneDNN computes the LM head 2.1-2.2x and the MLP projections 1.1-1.25x faster than
torch in training, and the small-row GEMM a decode step's products 1.0-2.2x faster than the faster of
the two at 8-32 rows and 1.07-1.7x at 64; ``benches/bench_linear.py`` measures them in one run, shape
by shape.

Switch: ``backend="auto"|"cpp"|"onednn"|"torch"`` per call, or ``SPICE_FAST_LINEAR`` (``auto``, the
default, picks as above; ``cpp`` takes the small-row GEMM for every call without autograd, whatever
its size, and picks as ``auto`` otherwise; ``onednn`` never takes the small-row GEMM).
tests/test_linear.py compares values and gradients with ``linear_ref`` and fp64.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

from ._utils import cpu_ops, cpu_ops_available, plain_cpu_float32

log = logging.getLogger(__name__)

BACKENDS = ("auto", "cpp", "onednn", "torch")


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


_onednn_built: list[bool] = []  # [this torch build has oneDNN and its linear op], once known


def onednn_available() -> bool:
    if not _onednn_built:
        _onednn_built.append(
            torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        )
    return _onednn_built[0] and torch.backends.mkldnn.enabled  # enabled: switched by torch.backends flags


# Measured with benches/bench_linear.py on the 2-core Zen 4: oneDNN's per-call cost outweighs its
# faster kernel for small weights (the 576x192 K/V and 576x576 Q/O projections run 0.7-1.0x torch's
# speed through it), and its input-gradient product only wins on large batches. The small-row GEMM
# wins on every layer shape at 1-32 rows (1.1-2.2x) and, with its broadcast kernel on blocks of 32
# rows, at 64 (1.07-1.7x against the faster of oneDNN and torch); at 128 rows it still wins on Q/O and
# the LM head but loses on K/V (0.7x) and ties or loses on the MLP (0.9-1.0x).
MIN_WEIGHT_NUMEL = 1 << 19  # oneDNN forward: weights of at least this many elements (MLP, LM head)
MIN_DGRAD_ROWS = 1024  # oneDNN backward: input gradients of at least this many rows (and a large weight)
SMALL_GEMM_MAX_ROWS = 64  # small-row GEMM: calls without autograd of at most this many rows
SMALL_GEMM_MAX_WEIGHT_NUMEL = 1 << 26  # ... and weights under this many elements (larger: not measured)


def _cpu_fast_path_applies(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Plain float32 CPU operands of matching shapes (a mismatch is left to ``F.linear`` to name)."""
    return (
        plain_cpu_float32(x, weight, *([] if bias is None else [bias]))
        and weight.dim() == 2
        and (bias is None or bias.dim() == 1)
        and x.numel() > 0
        and x.shape[-1] == weight.shape[1]
        and (bias is None or bias.shape[0] == weight.shape[0])
    )


_small_gemm_ok: list[bool] = []  # [extension built and the CPU runs its AVX-512 build], once known


def small_gemm_available() -> bool:
    if not _small_gemm_ok:
        _small_gemm_ok.append(cpu_ops_available() and bool(cpu_ops().small_gemm_vectorized()))
    return _small_gemm_ok[0]


SMALL_GEMM_KERNELS = {"auto": 0, "dot": 1, "broadcast": 2}  # csrc/ops/small_gemm.h GemmKernel


def _small_gemm(
    x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "auto"
) -> torch.Tensor:
    """``x2 @ weight.T + bias`` for a 2-D float32 ``x2`` [M, K] through the C++ small-row GEMM
    (``kernel``: which of its two kernels, ``"auto"`` by the row count; tests and benches force one)."""
    x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
    w = weight if weight.stride(1) == 1 else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    m, k = x2.shape
    out = torch.empty(m, w.shape[0], dtype=torch.float32)
    cpu_ops().small_gemm(
        x2.data_ptr(), x2.stride(0), w.data_ptr(), w.stride(0), 0 if b is None else b.data_ptr(),
        out.data_ptr(), out.stride(0), m, w.shape[0], k, torch.get_num_threads(), SMALL_GEMM_KERNELS[kernel],
    )  # fmt: skip
    return out


def pick_linear_backend(backend: str | None) -> str:
    """The argument, else ``SPICE_FAST_LINEAR``, checked: ``"auto"``, ``"cpp"``, ``"onednn"`` or
    ``"torch"``. A forced ``"cpp"`` or ``"onednn"`` that this build cannot run is an error; ``"auto"``
    says once in the log that oneDNN is missing."""
    choice = backend if backend is not None else os.environ.get("SPICE_FAST_LINEAR", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or SPICE_FAST_LINEAR), got {choice!r}")
    if choice == "cpp" and not small_gemm_available():
        raise ValueError(
            "backend='cpp' was forced but the small-row GEMM is not available (spice_fast._cpu_ops not "
            "built, or a CPU without AVX-512)"
        )
    if choice != "torch" and not onednn_available():
        if choice == "onednn":
            raise ValueError("backend='onednn' was forced but this torch build has no oneDNN (mkldnn)")
        _warn_once()
    return choice


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
        return _linear_grads(grad, x2, weight, ctx.needs_input_grad[:3], ctx.has_bias, onednn=True)


def _linear_grads(grad, x2, weight, needs, has_bias: bool, onednn: bool):
    """Gradients of ``x2 @ weight.T + bias`` (x2 [M, K]) for upstream ``grad`` [M, N]; ``onednn``: the
    input gradient of large batches through oneDNN."""
    grad = grad.contiguous()
    need_x, need_w, need_b = needs
    grad_x = None  # grad @ weight: [M, K]
    if need_x:
        big = onednn and len(grad) >= MIN_DGRAD_ROWS
        grad_x = _onednn_mm_t(grad, weight.t(), None) if big else grad.mm(weight)
    grad_w = grad.t().mm(x2) if need_w else None  # [N, K]
    grad_b = grad.sum(0) if need_b and has_bias else None
    return grad_x, grad_w, grad_b


class _ReplayLinear(torch.autograd.Function):
    """Forward: the rows ``taken`` from a record of this product (``recorded[record_rows]``), the
    ``computed`` rows by the GEMM; backward: the full product's gradients over every row."""

    @staticmethod
    def forward(ctx, x2, weight, bias, recorded, taken, record_rows, computed):
        ctx.save_for_backward(x2, weight)
        ctx.has_bias = bias is not None
        if not computed.numel():  # every row from the record, ``taken`` in order: one gather
            return recorded.index_select(0, record_rows)
        out = x2.new_empty(x2.shape[0], weight.shape[0])
        with torch.no_grad():
            out.index_copy_(0, computed, linear(x2.index_select(0, computed), weight, bias))
        out.index_copy_(0, taken, recorded.index_select(0, record_rows))
        return out

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        onednn = weight.numel() >= MIN_WEIGHT_NUMEL and onednn_available()
        grads = _linear_grads(grad, x2, weight, ctx.needs_input_grad[:3], ctx.has_bias, onednn)
        return *grads, None, None, None, None


def replay_linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N]
    recorded: torch.Tensor,  # [R, N] this product's outputs recorded earlier (any row stride)
    taken: torch.Tensor,  # [T] rows of x whose product is taken from the record
    record_rows: torch.Tensor,  # [T] their rows in ``recorded``
    computed: torch.Tensor,  # [M - T] the other rows of x, computed
) -> torch.Tensor:  # [M, N]
    """``linear(x, weight, bias)`` whose forward takes the rows ``taken`` from ``recorded`` instead of
    computing them: equal to it when the record holds this product of these rows under these weights
    (the sampler's decode steps record theirs, ``spice_fast.model.replay``). Gradients are the full
    product's, for every row, as ``linear``'s. A float32 CPU path (``linear`` elsewhere)."""
    if x.dim() != 2 or recorded.dim() != 2 or recorded.shape[1] != weight.shape[0]:
        raise ValueError(
            f"replay_linear: x [M, K] and recorded [R, {weight.shape[0]}] expected, got "
            f"{tuple(x.shape)} and {tuple(recorded.shape)}"
        )
    if (
        taken.shape != record_rows.shape
        or taken.numel() + computed.numel() != x.shape[0]
        or (not computed.numel() and not torch.equal(taken, torch.arange(x.shape[0])))
    ):
        raise ValueError(
            f"replay_linear: {taken.numel()} taken rows ({record_rows.numel()} record rows) and "
            f"{computed.numel()} computed rows must cover the {x.shape[0]} rows of x (in order when all "
            "are taken)"
        )
    return _ReplayLinear.apply(x.contiguous(), weight, bias, recorded, taken, record_rows, computed)


def linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    backend: str | None = None,
) -> torch.Tensor:  # [..., N]
    """``F.linear(x, weight, bias)``: on float32 CPU tensors through the small-row GEMM or oneDNN
    (see the module docstring)."""
    if not _cpu_fast_path_applies(x, weight, bias):
        return linear_ref(x, weight, bias)
    choice = pick_linear_backend(backend)
    if choice == "torch":
        return linear_ref(x, weight, bias)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    needs_grad = x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    training = torch.is_grad_enabled() and needs_grad
    if not training and choice != "onednn" and small_gemm_available():
        small = x2.shape[0] <= SMALL_GEMM_MAX_ROWS and weight.numel() < SMALL_GEMM_MAX_WEIGHT_NUMEL
        if small or choice == "cpp":
            return _small_gemm(x2, weight, bias).view(*lead, weight.shape[0])
    if weight.numel() < MIN_WEIGHT_NUMEL or not onednn_available():
        return linear_ref(x, weight, bias)
    x2 = x2.contiguous()
    w = weight if weight.is_contiguous() else weight.contiguous()
    out = _OneDNNLinear.apply(x2, w, bias) if training else _onednn_mm_t(x2, w, bias)
    return out.view(*lead, weight.shape[0])
