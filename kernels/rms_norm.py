"""RMSNorm over the last dimension: ``weight * x / sqrt(mean(x^2) + eps)``.

* ``rms_norm_ref``: plain torch (the statistic in float32 whatever the input dtype, as transformers'
  LlamaRMSNorm does), the definition of correct. Seven element-wise passes forward, more backward,
  each a separate op.
* ``rms_norm``: the same function. On float32 CPU tensors a C++ kernel (``csrc/ops``, module
  ``spice_fast._cpu_ops``) does the forward in one pass per row and the backward in one pass per row
  (the weight gradient summed per thread range, then in row order, so it is deterministic). In a
  decode step that is one call instead of seven per norm; in training about 10x less time for the
  norms. Elsewhere (CUDA, other dtypes, the extension not built) it is ``rms_norm_ref``.

Switch: ``backend="cpp"|"torch"`` per call, or ``SPICE_FAST_RMS_NORM=auto|cpp|torch``.
tests/test_rms_norm.py compares values and gradients with the reference.
"""

from __future__ import annotations

import torch

from ._utils import cpu_ops, pick_cpp_backend, plain_cpu_float32


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _forward(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, dim = x2.shape
    y, rstd = torch.empty_like(x2), torch.empty(rows, dtype=torch.float32)
    cpu_ops().rms_norm_forward(
        x2.data_ptr(),
        weight.data_ptr(),
        y.data_ptr(),
        rstd.data_ptr(),
        rows,
        dim,
        eps,
        torch.get_num_threads(),
    )
    return y, rstd


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, eps):
        y, rstd = _forward(x2, weight, eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x2, weight, rstd = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x, grad_w = torch.empty_like(x2), torch.empty_like(weight)
        rows, dim = x2.shape
        cpu_ops().rms_norm_backward(
            grad.data_ptr(), x2.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad_x.data_ptr(),
            grad_w.data_ptr(), rows, dim, torch.get_num_threads(),
        )  # fmt: skip
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str | None = None) -> torch.Tensor:
    """RMSNorm of ``x`` [..., D] with ``weight`` [D]; one C++ pass each way on float32 CPU tensors."""
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(
            f"weight must be [{x.shape[-1]}] for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if (
        not plain_cpu_float32(x, weight)
        or x.numel() == 0
        or pick_cpp_backend(backend, "SPICE_FAST_RMS_NORM") == "torch"
    ):
        return rms_norm_ref(x, weight, eps)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w = weight.contiguous()
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _RMSNorm.apply(x2, w, float(eps)).view(x.shape)
    return _forward(x2, w, float(eps))[0].view(x.shape)
