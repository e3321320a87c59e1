"""The decoder-only causal LM (Llama, Qwen2, Qwen3) in plain PyTorch.

Parameter names equal those of transformers' ``*ForCausalLM`` (``model.layers.0.self_attn.q_proj.weight``
...), so checkpoints map one to one. The same parameter tensors serve the trainer (packed causal
attention, autograd, optional gradient checkpointing) and the sampler (paged KV decode): nothing is
copied between the two.

Contract: ``model(input_ids)`` with ``[B, T]`` unpadded ids returns float32 logits ``[B, T, V]``;
``model.hidden_states(input_ids)`` the final normed hidden states ``[B, T, H]``;
``model.lm_head_weight`` the ``[V, H]`` output matrix (the embedding when tied).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from spice_fast.kernels.linear import linear
from spice_fast.model.attention import Attention, AttentionBatch, PagedKVCache
from spice_fast.model.config import ModelConfig
from spice_fast.model.cpu_decode import DecodeRecordRows, decode_layers_cpu, decode_step_applies
from spice_fast.model.layers import MLP, Linear, RMSNorm, RotaryEmbedding
from spice_fast.model.replay import PRODUCTS, Recording, Replay, product_columns, recording, replaying


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, batch: AttentionBatch, kv_cache: PagedKVCache | None):
        x = x + self.self_attn(self.input_layernorm(x), (cos, sin), batch, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Decoder(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each layer in backward to save memory
        columns = product_columns(config)
        for i, layer in enumerate(self.model.layers):
            for name in PRODUCTS:
                module = getattr(
                    layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp, name
                )
                module.record_slot = (i, *columns[name])

    @property
    def lm_head_weight(self) -> torch.Tensor:  # [V, H]
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> CausalLM:
        """Random init as transformers does it: normal(0, initializer_range), zero biases, unit norms."""
        gen = torch.Generator(device=self.device)
        if seed is not None:
            gen.manual_seed(seed)
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                module.weight.normal_(0.0, std, generator=gen)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
            if isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
        return self

    def forward_hidden(
        self,
        input_ids: torch.Tensor,  # [N] flat token ids of the packed batch
        batch: AttentionBatch,
        kv_cache: PagedKVCache | None = None,
        *,
        record: DecodeRecordRows | None = None,
        replay: Replay | None = None,
    ) -> torch.Tensor:  # [N, H] final normed hidden states
        """``record``: a decode step copies its rows' products into ``record.record`` and marks them
        filled (the C++ step, or the Python layers); ``replay``: a training forward takes those rows'
        products from the record (spice_fast.model.replay; not with gradient checkpointing)."""
        if input_ids.dim() != 1:
            raise ValueError(f"forward_hidden takes flat [N] token ids, got shape {tuple(input_ids.shape)}")
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.model.rotary.cos_sin(batch.positions)
        if decode_step_applies(x, batch, kv_cache):  # a CPU decode step: all layers in one C++ call
            out = decode_layers_cpu(self, x, cos, sin, batch, kv_cache, record)
            if out is not None:
                return self.model.norm(out)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and kv_cache is None
        if replay is not None and (recompute or kv_cache is not None):
            raise ValueError("replay: a training forward without gradient checkpointing or KV cache only")
        # a decode step the C++ path did not run records through the Python layers
        rec = None if record is None else Recording(record.record, record.rows)
        with replaying(replay), recording(rec) if rec is not None else contextlib.nullcontext():
            for layer in self.model.layers:
                if recompute:
                    x = checkpoint(layer, x, cos, sin, batch, None, use_reentrant=False)
                else:
                    x = layer(x, cos, sin, batch, kv_cache)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [..., V] float32
        return linear(hidden, self.lm_head_weight).float()

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T, H]
        b, t = self._check_ids(input_ids)
        batch = AttentionBatch.packed([t] * b, input_ids.device)
        return self.forward_hidden(input_ids.reshape(-1), batch).view(b, t, -1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [B, T, V] float32
        return self.logits(self.hidden_states(input_ids))

    def _check_ids(self, input_ids: torch.Tensor) -> tuple[int, int]:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [B, T] LongTensor, got {got}")
        b, t = input_ids.shape
        if b == 0 or t == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {(b, t)}")
        return b, t
