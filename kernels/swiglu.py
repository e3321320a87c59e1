"""SwiGLU, the gated activation of the Llama / Qwen MLP: ``h = silu(gate) * up``.

* ``swiglu_ref``: ``F.silu(gate) * up`` with torch's autograd, the definition of correct. It runs three
  element-wise passes forward (silu, multiply) and four backward (two multiplies, silu's backward, an
  add), each allocating a full ``[tokens, intermediate]`` tensor, and keeps ``silu(gate)`` alive for the
  backward.
* ``swiglu``: the same function. On float32 CPU tensors of at least ``MIN_NUMEL`` elements a C++
  kernel (``csrc/ops``, module ``spice_fast._cpu_ops``) computes the forward in one pass and both
  input gradients in one pass, and only ``gate`` and ``up`` are saved. Elsewhere (CUDA, other dtypes,
  smaller tensors, the extension not built) it is ``swiglu_ref``.

Switch: ``backend="cpp"|"torch"`` per call, or ``SPICE_FAST_SWIGLU=auto|cpp|torch``.
tests/test_swiglu.py compares values and gradients with the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import cpu_ops, pick_cpp_backend, plain_cpu_float32

# Below this many elements (decode steps, small batches) torch's own element-wise kernels are as fast
# and the fused kernel only adds call overhead (benches/bench_linear.py).
MIN_NUMEL = 1 << 20


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(gate)
    cpu_ops().swiglu_forward(
        gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel(), torch.get_num_threads()
    )
    return out


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return _forward(gate, up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        cpu_ops().swiglu_backward(
            grad.data_ptr(), gate.data_ptr(), up.data_ptr(), grad_gate.data_ptr(), grad_up.data_ptr(),
            gate.numel(), torch.get_num_threads(),
        )  # fmt: skip
        return grad_gate, grad_up


def swiglu(gate: torch.Tensor, up: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """``F.silu(gate) * up`` (same shapes), one fused pass each way on float32 CPU tensors."""
    if gate.shape != up.shape:
        raise ValueError(
            f"gate and up must have the same shape, got {tuple(gate.shape)} and {tuple(up.shape)}"
        )
    if (
        not plain_cpu_float32(gate, up)
        or (gate.numel() < MIN_NUMEL and backend is None)
        or pick_cpp_backend(backend, "SPICE_FAST_SWIGLU") == "torch"
    ):
        return swiglu_ref(gate, up)
    gate, up = gate.contiguous(), up.contiguous()
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SwiGLU.apply(gate, up)
    return _forward(gate, up)
