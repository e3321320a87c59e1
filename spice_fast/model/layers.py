"""Building blocks of the decoder: RMSNorm, rotary position embedding, SwiGLU MLP.

Each matches its transformers counterpart (LlamaRMSNorm, LlamaRotaryEmbedding with the default,
linear and llama3 rope types, LlamaMLP) to float32 rounding; tests/test_model.py checks the whole
model's logits against transformers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from spice_fast.kernels.linear import linear, replay_linear
from spice_fast.kernels.rms_norm import rms_norm
from spice_fast.kernels.rope import rope
from spice_fast.kernels.swiglu import swiglu
from spice_fast.model.config import ModelConfig
from spice_fast.model.replay import active as active_replay
from spice_fast.model.replay import active_recording


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The statistic in fp32 whatever the activation dtype (bf16 sums of squares lose digits); one
        # C++ pass on float32 CPU tensors (spice_fast.kernels.rms_norm).
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:  # [head_dim // 2] float32
    # Always on the CPU, also when the model is built under torch.device("meta") for loading.
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / float(scaling["factor"])
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between.
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by position, in the half-split layout of Hugging Face checkpoints."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies.
        self._inv_freq = rope_inv_freq(config)
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def _freqs(self, device: torch.device) -> torch.Tensor:
        cached = self._inv_freq_by_device.get(device)
        if cached is None:
            cached = self._inv_freq.to(device)
            self._inv_freq_by_device[device] = cached
        return cached

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # [N, D] each
        angles = positions.float()[:, None] * self._freqs(positions.device)[None, :]  # [N, D/2]
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos(), emb.sin()

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [N, heads, D]; cos/sin [N, D] in fp32; one C++ pass on float32 CPU tensors.
        return rope(x, cos, sin)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict names) whose product runs through
    ``spice_fast.kernels.linear``: oneDNN on float32 CPU tensors, ``F.linear`` elsewhere. Inside
    ``replay.replaying(...)`` a layer with a ``record_slot`` takes the recorded rows' products from the
    record (``replay_linear``)."""

    record_slot: tuple[int, int, int] | None = None  # (layer, first, end column) in a replay record

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        replay = active_replay()
        if replay is not None and self.record_slot is not None and x.dim() == 2:
            layer, start, end = self.record_slot
            recorded = replay.record.data[layer, :, start:end]
            return replay_linear(
                x, self.weight, self.bias, recorded, replay.taken, replay.record_rows, replay.computed
            )  # fmt: skip
        y = linear(x, self.weight, self.bias)
        rec = active_recording()
        if rec is not None and self.record_slot is not None:
            rec.keep(*self.record_slot, y)
        return y


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, i, bias=bias)
        self.up_proj = Linear(h, i, bias=bias)
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
