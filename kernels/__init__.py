"""Triton kernels of spice_fast, installed as ``spice_fast.kernels``.

Each operation has three layers (see STYLE.md): ``_<op>_kernel`` (the ``@triton.jit`` function),
``<op>`` (the launcher) and ``<op>_ref`` (plain PyTorch, the definition of correct). Importing this
package never imports the engine, the trainer or transformers, so any trainer can use the kernels
on plain torch tensors.

The model's CPU layers live in the submodules ``linear``, ``rms_norm``, ``rope`` and ``swiglu`` (each
``<op>`` and ``<op>_ref``; not re-exported here, where the functions would hide the modules): float32
CPU tensors go through oneDNN or the C++ kernels of ``csrc/ops``, anything else through the reference.

Training kernels pick Triton for CUDA tensors and a chunked PyTorch path on the CPU; force either with
``backend=`` or ``SPICE_FAST_KERNELS=triton|torch|auto`` (Triton on a CPU needs ``TRITON_INTERPRET=1``).
"""

from spice_fast.kernels.fused_grpo import fused_grpo_loss
from spice_fast.kernels.grpo import grpo_advantages, grpo_advantages_ref, policy_loss, policy_loss_ref
from spice_fast.kernels.logprob import fused_linear_logprob, fused_linear_logprob_ref
from spice_fast.kernels.paged_attention import paged_decode_attention_ref

__all__ = [
    "fused_grpo_loss",
    "fused_linear_logprob",
    "fused_linear_logprob_ref",
    "grpo_advantages",
    "grpo_advantages_ref",
    "paged_decode_attention_ref",
    "policy_loss",
    "policy_loss_ref",
]
