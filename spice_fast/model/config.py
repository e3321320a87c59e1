"""Model configuration: one dataclass for the Llama / Qwen2 / Qwen3 decoder family.

``ModelConfig.from_hf(d)`` reads a Hugging Face ``config.json`` dict (transformers 4.x keys such as
``rope_theta``/``rope_scaling`` and 5.x ``rope_parameters`` alike); ``to_hf()`` writes one that
``transformers.AutoConfig`` reads back to the same model. Unknown keys of the source config are
kept and written back unchanged, so a round trip loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Hugging Face architecture name -> model_type.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_ARCH_BY_MODEL_TYPE = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}
_ROPE_TYPES = ("default", "linear", "llama3")
# Keys that describe how a source file was stored, not the model; never written back.
_DROPPED_KEYS = (
    "quantization_config", "_name_or_path", "_model_name_or_path", "rope_parameters",
    "dtype", "torch_dtype", "transformers_version",
)  # fmt: skip


def _check_architecture(name: str) -> None:
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported architecture {name!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}")


@dataclass
class ModelConfig:
    architecture: str  # a key of SUPPORTED_ARCHITECTURES
    vocab_size: int  # rows of the embedding and the LM head
    hidden_size: int  # model width H
    intermediate_size: int  # SwiGLU inner width
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = num_heads
    head_dim: int | None = None  # per-head width; None = hidden_size // num_heads
    rms_norm_eps: float = 1e-6  # epsilon of every RMSNorm
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "linear"|"llama3", ...} or None
    max_position_embeddings: int = 4096  # longest position the model was trained for
    tie_word_embeddings: bool = False  # LM head shares the embedding matrix
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2: always)
    o_bias: bool = False  # bias on the output projection
    mlp_bias: bool = False  # bias on the SwiGLU projections
    qk_norm: bool = False  # RMSNorm over head_dim on q and k (Qwen3)
    bos_token_id: int | None = None  # beginning of sequence
    eos_token_id: int | list[int] | None = None  # end of sequence (one or several ids)
    pad_token_id: int | None = None  # padding id, if any
    initializer_range: float = 0.02  # std of the random init
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # other keys of the source config

    def __post_init__(self) -> None:
        _check_architecture(self.architecture)
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a positive multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "give head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(
                f"head_dim must be a positive even int (RoPE rotates pairs), got {self.head_dim}"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(
                    f"unsupported rope_scaling type {rope_type!r}; supported: {list(_ROPE_TYPES)}"
                )
            self.rope_scaling = {**self.rope_scaling, "rope_type": rope_type}
            if rope_type == "default":
                self.rope_scaling = None

    @property
    def model_type(self) -> str:
        return SUPPORTED_ARCHITECTURES[self.architecture]

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, list | tuple) else [self.eos_token_id]

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config dict; raises ``ValueError`` on unsupported models."""
        d = dict(d)
        architectures = d.get("architectures") or []
        if architectures:
            architecture = architectures[0]
        elif d.get("model_type") in _ARCH_BY_MODEL_TYPE:
            architecture = _ARCH_BY_MODEL_TYPE[d["model_type"]]
        else:
            architecture = d.get("model_type", "<missing architectures and model_type>")
        _check_architecture(architecture)
        model_type = SUPPORTED_ARCHITECTURES[architecture]
        if d.get("use_sliding_window"):
            raise ValueError(f"{architecture} with use_sliding_window=true is not supported")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r}; the SwiGLU MLP needs 'silu'")
        rope_params = d.get("rope_parameters") or {}
        rope_theta = d.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and rope_params.get("rope_type", "default") != "default":
            rope_scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
        attention_bias = bool(d.get("attention_bias", False))
        known = dict(
            architecture=architecture,
            vocab_size=d.get("vocab_size"),
            hidden_size=d.get("hidden_size"),
            intermediate_size=d.get("intermediate_size"),
            num_layers=d.get("num_hidden_layers"),
            num_heads=d.get("num_attention_heads"),
            num_kv_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            initializer_range=float(d.get("initializer_range", 0.02)),
        )
        consumed = {
            "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
            "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
            "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
            "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id",
            "initializer_range", "hidden_act",
        }  # fmt: skip
        extra = {k: v for k, v in d.items() if k not in consumed and k not in _DROPPED_KEYS}
        return cls(**known, extra=extra)

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """A config.json dict that transformers (4.x and 5.x) loads as this model."""
        d: dict[str, Any] = dict(self.extra)
        d.update(
            architectures=[self.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act="silu",
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            initializer_range=self.initializer_range,
        )
        if self.model_type == "qwen2":
            if self.o_bias or not self.qkv_bias:
                raise ValueError("Qwen2 has bias on q/k/v and none on the output projection")
        else:
            if self.qkv_bias != self.o_bias:
                raise ValueError(f"{self.architecture} ties the q/k/v and output biases (attention_bias)")
            d["attention_bias"] = self.qkv_bias
        if self.model_type == "llama":
            d["mlp_bias"] = self.mlp_bias
        elif self.mlp_bias:
            raise ValueError(f"{self.architecture} has no mlp_bias")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError(f"qk_norm={self.qk_norm} does not match {self.architecture}")
        if dtype is not None:
            d["torch_dtype"] = dtype
        return d
