"""The Llama / Qwen2 / Qwen3 decoder family in plain PyTorch; see transformer.py."""

from spice_fast.model.attention import AttentionBatch, PagedKVCache, set_attention_backend
from spice_fast.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from spice_fast.model.transformer import CausalLM

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "AttentionBatch",
    "CausalLM",
    "ModelConfig",
    "PagedKVCache",
    "set_attention_backend",
]
