"""A decode step's decoder layers in one C++ call on the CPU (``csrc/ops/decode_layers.cpp``).

The sampler's decode steps on a CPU run few rows (one per sequence) through 30 layers of small
operations, whose Python and dispatch cost (~16 operations per layer) is paid again every step.
``decode_layers_cpu`` runs every layer of the step in one call
over the model's own parameter tensors and KV pool (nothing copied), with the same C++ kernels the
Python layers call on these shapes (RMSNorm, the small-row GEMM, RoPE, paged decode attention); the
one difference is SwiGLU, which the Python layers leave to torch below 2^20 elements and this path
runs in C++ (float32 rounding apart, the same function).

It applies (``decode_step_applies``) to float32 CPU parameters and caches, at most
``SMALL_GEMM_MAX_ROWS`` rows, outside autograd, when the extension is built and the small-row GEMM
runs on this CPU; elsewhere the Python layers run. Switch: ``SPICE_FAST_CPU_DECODE=auto|cpp|torch``
(``torch``: always the Python layers; ``SPICE_FAST_LINEAR=torch|onednn`` also turns it off, since it
would bypass those choices). tests/test_model.py compares the two paths through the engine;
benches/bench_sampler.py times the engine against transformers (with this path, the C++ sampler and
the grouped decode attention: 2.33x, from 1.90x before them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from spice_fast.kernels._utils import PLAIN_TENSORS, cpu_ops
from spice_fast.kernels.linear import SMALL_GEMM_MAX_ROWS, pick_linear_backend, small_gemm_available
from spice_fast.model.attention import AttentionBatch, PagedKVCache
from spice_fast.model.replay import ActivationRecord

_MODES = ("auto", "cpp", "torch")


def _enabled() -> bool:
    mode = os.environ.get("SPICE_FAST_CPU_DECODE", "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"SPICE_FAST_CPU_DECODE must be one of {_MODES}, got {mode!r}")
    return mode != "torch" and pick_linear_backend(None) in ("auto", "cpp") and small_gemm_available()


def cpu_decode_enabled() -> bool:
    """Whether float32 CPU decode steps run in C++ here (the extension built, AVX-512, not switched off)."""
    return cpu_ops() is not None and _enabled()


def _plain_f32(t: torch.Tensor | None) -> bool:
    return t is None or (
        type(t) in PLAIN_TENSORS and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
    )


def _layer_pointers(model, kv_cache: PagedKVCache) -> list[int] | None:
    """The kNumLayerTensors pointers of every layer (0 for what the model lacks), or None when a tensor
    is not a plain contiguous float32 CPU tensor."""
    out: list[int] = []
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        q_norm = attn.q_norm.weight if attn.qk_norm else None
        k_norm = attn.k_norm.weight if attn.qk_norm else None
        tensors = [
            layer.input_layernorm.weight, attn.q_proj.weight, attn.q_proj.bias, attn.k_proj.weight,
            attn.k_proj.bias, attn.v_proj.weight, attn.v_proj.bias, attn.o_proj.weight, attn.o_proj.bias,
            q_norm, k_norm, layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.gate_proj.bias,
            mlp.up_proj.weight, mlp.up_proj.bias, mlp.down_proj.weight, mlp.down_proj.bias,
            kv_cache.k[i], kv_cache.v[i],
        ]  # fmt: skip
        if not all(_plain_f32(t) for t in tensors):
            return None
        out += [0 if t is None else t.data_ptr() for t in tensors]
    return out


def decode_step_applies(x: torch.Tensor, batch: AttentionBatch, kv_cache: PagedKVCache | None) -> bool:
    return (
        kv_cache is not None
        and batch.is_decode
        and not torch.is_grad_enabled()
        and 0 < x.shape[0] <= SMALL_GEMM_MAX_ROWS
        and _plain_f32(x)
        and cpu_decode_enabled()
    )


@dataclass
class DecodeRecordRows:
    """A decode step's rows to record: row r's products go to ``record`` row ``rows[r]`` (-1: not
    recorded). Whichever path runs the step (this C++ one, or the Python layers through
    ``replay.recording``) writes them and marks them filled."""

    record: ActivationRecord
    rows: torch.Tensor  # [B] int64


def decode_layers_cpu(
    model,
    x: torch.Tensor,  # [B, H] embeddings of the step's tokens
    cos: torch.Tensor,  # [B, D]
    sin: torch.Tensor,
    batch: AttentionBatch,
    kv_cache: PagedKVCache,
    record: DecodeRecordRows | None = None,
) -> torch.Tensor | None:  # [B, H] after the last layer (before the final norm); None: not applicable
    pointers = _layer_pointers(model, kv_cache)
    if pointers is None:
        return None
    rec_args = {}
    if record is not None:
        data, rows = record.record.data, record.rows.to(torch.int64).contiguous()
        if (
            rows.shape != (x.shape[0],)
            or data.shape[0] != model.config.num_layers
            or not data.is_contiguous()
        ):
            raise ValueError(
                f"decode record: {x.shape[0]} row indices and a contiguous [layers, rows, width] record "
                f"expected, got {tuple(rows.shape)} and {tuple(data.shape)}"
            )
        if bool((rows >= data.shape[1]).any()):
            raise ValueError(f"decode record: a row index is past the record's {data.shape[1]} rows")
        rec_args = {
            "record": data.data_ptr(), "record_rows": rows.data_ptr(), "record_num_rows": data.shape[1],
            "record_width": data.shape[2],
        }  # fmt: skip
    config = model.config
    x = x.clone()  # updated in place through the layers
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    slots = batch.slot_mapping.to(torch.int64).contiguous()
    tables = batch.block_tables.to(torch.int32).contiguous()
    lens = batch.context_lens.to(torch.int32).contiguous()
    cpu_ops().decode_layers(
        x.data_ptr(), pointers, x.shape[0], config.hidden_size, config.num_heads, config.num_kv_heads,
        config.head_dim, config.intermediate_size, config.rms_norm_eps, config.head_dim**-0.5,
        cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), tables.data_ptr(), lens.data_ptr(),
        tables.stride(0), tables.shape[1], kv_cache.num_blocks, kv_cache.block_size, torch.get_num_threads(),
        **rec_args,
    )  # fmt: skip
    if record is not None:
        record.record.filled[rows[rows >= 0]] = True
    return x
