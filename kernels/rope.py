"""Rotary position embedding in the half-split layout of Hugging Face checkpoints.

* ``rope_ref``: ``x * cos + rotate_half(x) * sin`` in plain torch, with ``x`` taken to float32 and the
  result cast back (as transformers' Llama does), the definition of correct: six element-wise ops
  forward, each allocating.
* ``rope``: the same function. On float32 CPU tensors a C++ kernel (``csrc/ops``, module
  ``spice_fast._cpu_ops``) rotates in one pass, and its backward is the transposed rotation in one
  pass (nothing saved but ``cos`` and ``sin``). Elsewhere (CUDA, other dtypes, the extension not
  built) it is ``rope_ref``.

Switch: ``backend="cpp"|"torch"`` per call, or ``SPICE_FAST_ROPE=auto|cpp|torch``.
tests/test_rope.py compares values and gradients with the reference.
"""

from __future__ import annotations

import torch

from ._utils import cpu_ops, pick_cpp_backend, plain_cpu_float32


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [N, heads, D]; cos/sin [N, D] in fp32.
    half = x.shape[-1] // 2
    x32 = x.float()
    rotated = torch.cat((-x32[..., half:], x32[..., :half]), dim=-1)
    return (x32 * cos[:, None, :] + rotated * sin[:, None, :]).to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    y = torch.empty_like(x)
    n, heads, dim = x.shape
    cpu_ops().rope(
        x.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        y.data_ptr(),
        n,
        heads,
        dim,
        backward,
        torch.get_num_threads(),
    )
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad.contiguous(), cos, sin, backward=True), None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Rotate ``x`` [N, heads, D] by ``cos``/``sin`` [N, D]; one C++ pass each way on float32 CPU tensors."""
    if x.dim() != 3 or cos.shape != (x.shape[0], x.shape[2]) or sin.shape != cos.shape or x.shape[2] % 2:
        raise ValueError(
            f"rope takes x [N, heads, D] (D even) and cos, sin [N, D]; got x {tuple(x.shape)}, "
            f"cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    if (
        not plain_cpu_float32(x)
        or cos.dtype != torch.float32
        or sin.dtype != torch.float32
        or cos.requires_grad
        or sin.requires_grad
        or x.numel() == 0
        or pick_cpp_backend(backend, "SPICE_FAST_ROPE") == "torch"
    ):
        return rope_ref(x, cos, sin)
    x, cos, sin = x.contiguous(), cos.contiguous(), sin.contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rope.apply(x, cos, sin)
    return _rotate(x, cos, sin, backward=False)
