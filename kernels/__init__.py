"""Triton kernels of spice_fast, installed as ``spice_fast.kernels``.

Each operation has three layers (see STYLE.md): ``_<op>_kernel`` (the ``@triton.jit`` function),
``<op>`` (the launcher) and ``<op>_ref`` (plain PyTorch, the definition of correct). Importing this
package never imports the engine, the trainer or transformers, so any trainer can use the kernels
on plain torch tensors.
"""

from spice_fast.kernels.paged_attention import paged_decode_attention_ref

__all__ = ["paged_decode_attention_ref"]
