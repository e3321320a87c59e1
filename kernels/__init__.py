"""Triton kernels of spice_fast, installed as ``spice_fast.kernels``.

Each operation has three layers (see STYLE.md): ``_<op>_kernel`` (the ``@triton.jit`` function),
``<op>`` (the launcher) and ``<op>_ref`` (plain PyTorch, the definition of correct). Importing this
package never imports the engine, the trainer or transformers, so any trainer can use the kernels
on plain torch tensors.

The model's CPU layers (``linear``, ``rms_norm``, ``rope``, ``swiglu``) take float32 CPU tensors through
oneDNN or the C++ kernels of ``csrc/ops`` and fall back to their ``_ref`` elsewhere.

Training kernels pick Triton for CUDA tensors and a chunked PyTorch path on the CPU; force either with
``backend=`` or ``SPICE_FAST_KERNELS=triton|torch|auto`` (Triton on a CPU needs ``TRITON_INTERPRET=1``).
"""

from spice_fast.kernels.fused_grpo import fused_grpo_loss
from spice_fast.kernels.grpo import grpo_advantages, grpo_advantages_ref, policy_loss, policy_loss_ref
from spice_fast.kernels.linear import linear, linear_ref
from spice_fast.kernels.logprob import fused_linear_logprob, fused_linear_logprob_ref
from spice_fast.kernels.paged_attention import paged_decode_attention_ref
from spice_fast.kernels.rms_norm import rms_norm, rms_norm_ref
from spice_fast.kernels.rope import rope, rope_ref
from spice_fast.kernels.swiglu import swiglu, swiglu_ref

__all__ = [
    "fused_grpo_loss",
    "fused_linear_logprob",
    "fused_linear_logprob_ref",
    "grpo_advantages",
    "grpo_advantages_ref",
    "linear",
    "linear_ref",
    "paged_decode_attention_ref",
    "policy_loss",
    "policy_loss_ref",
    "rms_norm",
    "rms_norm_ref",
    "rope",
    "rope_ref",
    "swiglu",
    "swiglu_ref",
]
