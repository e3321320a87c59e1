"""Attention of the decoder in its two modes, over one set of projection weights.

* Packed mode (training and prefill): the tokens of several sequences of any lengths are
  concatenated into one ``[N, H]`` batch described by ``cu_seqlens``; attention is causal within each
  sequence. Backends: flash-attn's varlen kernel on a GPU when installed (fp16/bf16); on the CPU in
  float32 the C++ tree-attention kernel of ``spice_fast.kernels.tree_attention`` (forward and
  backward, every sequence a root); else PyTorch SDPA (one batched call when all sequences have the
  same length, one call per sequence otherwise).
  ``AttentionBatch.shared_prefix`` packs a group of sequences that start with the same tokens as one
  segment, a prefix tree: the prefix once, then each sequence's remainder (a branch) that attends to
  the prefix and causally to itself, never to the other branches; a branch may again be shared (the
  answer-type part of the prompts of a document's samples of one type). A training pass then runs a
  document shared by G challenger samples once instead of G times. On the CPU in float32 the whole
  batch is one call of the C++ tree-attention kernel; elsewhere a root runs as a causal sequence and
  every other node as one SDPA call over its ancestors' keys and its own (a boolean mask of
  node x (ancestors + node)).
* Paged decode mode (sampler): one new token per sequence attends over its KV blocks in a
  ``PagedKVCache``: flash-attn's ``flash_attn_with_kvcache`` on a GPU when installed and the block
  size is a multiple of 256 (its paging granularity), else the Triton kernel of
  ``spice_fast.kernels.paged_attention`` on a GPU; on the CPU its C++ kernel, which reads the blocks
  in place (the PyTorch reference when the extension is not built).

In both modes, when a ``PagedKVCache`` and a ``slot_mapping`` are given, each token's K/V are
written to its slot of the pool first, so a prefill fills the cache that later decode steps read.
``set_attention_backend("torch")`` forces the PyTorch paths everywhere (tests, debugging; also the
baseline of ``benches/bench_tree_attention.py``), ``SPICE_FAST_TREE_ATTENTION=torch`` only in packed
mode;
``"triton"`` forces the Triton decode kernel, also on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from spice_fast.kernels.paged_attention import paged_decode_attention as _paged_decode_kernel
from spice_fast.kernels.paged_attention import paged_decode_attention_cpu, paged_decode_attention_ref
from spice_fast.kernels.tree_attention import (
    TreePlan,
    tree_attention,
    tree_attention_supported,
    tree_node,
    tree_plan,
)
from spice_fast.model.config import ModelConfig
from spice_fast.model.layers import Linear, RMSNorm, RotaryEmbedding

logger = logging.getLogger(__name__)

_BACKENDS = ("auto", "torch", "triton")
_backend = os.environ.get("SPICE_FAST_ATTENTION", "auto")
_flash = {}  # name -> flash-attn function, filled on first use


def set_attention_backend(name: str) -> None:
    """``"auto"``: fastest available kernel; ``"torch"``: PyTorch reference paths only; ``"triton"``:
    the Triton decode kernel wherever Triton runs (CPU tensors need ``TRITON_INTERPRET=1``)."""
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {name!r}")
    _backend = name


def _flash_fn(name: str):
    """A flash-attn function, or None when flash-attn is not installed (said once in the log)."""
    if not _flash:
        try:
            import flash_attn
        except ImportError:
            logger.info("flash-attn is not installed; attention uses PyTorch SDPA and Triton")
            flash_attn = None
        _flash["module"] = flash_attn
    module = _flash["module"]
    return getattr(module, name, None) if module is not None else None


# A prefix tree of token runs: (length, children); a child is a leaf length or a subtree.
PrefixTree = tuple[int, list["int | PrefixTree"]]


def _check_tree(node) -> tuple[int, list]:
    """``node`` as nested (length, [children]) tuples, leaves as (n, []); a clear error if malformed."""
    length, children = tree_node(node, "segment")
    return (length, [_check_tree(child) for child in children])


def _tree_tokens(node) -> int:
    return node[0] + sum(_tree_tokens(child) for child in node[1])


def _tree_positions(node, start: int, out: list[torch.Tensor]) -> None:
    out.append(torch.arange(start, start + node[0]))
    for child in node[1]:
        _tree_positions(child, start + node[0], out)


def _collapse(node) -> tuple[int, list]:
    """The same attention pattern with fewest pieces: empty subtrees dropped, and a node with one child
    merged into it (the child follows its tokens directly, so the two are one causal run)."""
    length, children = node[0], [c for c in map(_collapse, node[1]) if c != (0, [])]  # (0, []): empty
    while len(children) == 1:
        length, children = length + children[0][0], children[0][1]
    return (length, children)


@dataclass
class AttentionBatch:
    """Where each token of a flat ``[N]`` batch sits; built by ``packed()`` or ``decode()``."""

    positions: torch.Tensor  # [N] int64, position of each token in its sequence
    cu_seqlens: torch.Tensor | None = None  # [B+1] int32 sequence starts (packed mode)
    max_seqlen: int = 0  # longest sequence (packed mode)
    uniform_len: int = 0  # > 0 when every sequence has this length (packed mode)
    slot_mapping: torch.Tensor | None = None  # [N] int64 KV-pool slot of each token, to write K/V
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32 (decode mode)
    context_lens: torch.Tensor | None = None  # [B] int32 tokens attended, new one included (decode)
    segments: list[PrefixTree] | None = None  # shared-prefix packing, collapsed trees (see shared_prefix)
    prefix_lens: list[int] | None = None  # packed prefill after cached prompt blocks: tokens before each
    prefix_tables: list[list[int]] | None = None  # blocks of each sequence's cached prefix and new tokens
    _plan: TreePlan | None = field(default=None, repr=False)  # built on first use, shared by all layers

    def tree_plan(self) -> TreePlan:
        """The batch as nodes for the tree-attention kernel (packed mode): the segments' trees, or
        every sequence as a root."""
        if self._plan is None:
            if self.segments is not None:
                self._plan = tree_plan(self.segments)
            else:
                self._plan = tree_plan(torch.diff(self.cu_seqlens.cpu()).tolist())
        return self._plan

    @property
    def is_decode(self) -> bool:
        return self.block_tables is not None

    @classmethod
    def packed(
        cls, seq_lens: list[int], device: torch.device | str, slot_mapping: torch.Tensor | None = None
    ) -> AttentionBatch:
        if not seq_lens or min(seq_lens) <= 0:
            raise ValueError(f"seq_lens must be non-empty positive lengths, got {seq_lens}")
        lens = torch.tensor(seq_lens, dtype=torch.int32)
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int32)
        torch.cumsum(lens, 0, out=cu[1:])
        positions = torch.cat([torch.arange(n) for n in seq_lens])
        uniform = seq_lens[0] if all(n == seq_lens[0] for n in seq_lens) else 0
        return cls(
            positions=positions.to(device),
            cu_seqlens=cu.to(device),
            max_seqlen=max(seq_lens),
            uniform_len=uniform,
            slot_mapping=slot_mapping,
        )

    @classmethod
    def shared_prefix(cls, groups: list[PrefixTree], device: torch.device | str) -> AttentionBatch:
        """Segments packed as prefix trees. A segment is ``(prefix_len, [child, ...])``; a child is a
        branch length (a leaf) or again ``(length, [child, ...])``. Tokens are laid out depth first: a
        node's tokens, then each child's subtree in order. A node's tokens sit at the positions after
        all its ancestors' tokens (as if it followed them alone) and attend to those ancestors and
        causally to themselves, never to other branches. A branch may be empty.

        ``[(p, [a, b])]``: a prefix of p tokens shared by two branches. ``[(p, [a, (m, [b, c])])]``: a
        document prefix, one sample's branch, and a suffix of m tokens shared by two more samples."""
        if not groups:
            raise ValueError("groups must be non-empty")
        positions, lens, trees = [], [], []
        for group in groups:
            tree = _check_tree(group)
            num_tokens = _tree_tokens(tree)
            if num_tokens == 0:
                raise ValueError(f"bad segment: {group!r} has no tokens")
            _tree_positions(tree, 0, positions)
            lens.append(num_tokens)
            trees.append(_collapse(tree))
        batch = cls.packed(lens, device)
        if any(tree[1] for tree in trees):  # else every segment is one causal sequence: packed
            batch.positions = torch.cat(positions).to(device)
            batch.uniform_len = 0
            batch.segments = trees
        return batch

    @classmethod
    def decode(
        cls,
        positions: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> AttentionBatch:
        return cls(
            positions=positions,
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            context_lens=context_lens,
        )


@dataclass
class PagedKVCache:
    """The KV pool of all layers, allocated once; views per layer are taken without copies."""

    k: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]
    v: torch.Tensor  # [num_layers, num_blocks, block_size, num_kv_heads, head_dim]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """Bytes one block takes in the pool: K and V of every layer."""
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * dtype.itemsize

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> PagedKVCache:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        shape = (config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        )

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


def packed_causal_attention(
    q: torch.Tensor,  # [N, num_heads, D]
    k: torch.Tensor,  # [N, num_kv_heads, D]
    v: torch.Tensor,  # [N, num_kv_heads, D]
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:  # [N, num_heads, D]
    if _tree_kernel_applies(q, k):
        return tree_attention(q, k, v, batch.tree_plan(), scale)
    if batch.segments is not None:
        return _segment_attention(q, k, v, batch, scale)
    flash = _flash_fn("flash_attn_varlen_func") if _backend == "auto" and q.is_cuda else None
    if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
        return flash(
            q, k, v, batch.cu_seqlens, batch.cu_seqlens, batch.max_seqlen, batch.max_seqlen,
            softmax_scale=scale, causal=True,
        )  # fmt: skip
    if batch.uniform_len:
        n, t = q.shape[0] // batch.uniform_len, batch.uniform_len
        out = _sdpa_causal(*(x.view(n, t, *x.shape[1:]) for x in (q, k, v)), scale)
        return out.reshape(q.shape)
    bounds = batch.cu_seqlens.tolist()
    outs = [
        _sdpa_causal(q[None, s:e], k[None, s:e], v[None, s:e], scale)[0]
        for s, e in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    return torch.cat(outs, dim=0)


def _tree_kernel_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    """The C++ tree-attention kernel runs unless the backend is forced or
    ``SPICE_FAST_TREE_ATTENTION=torch`` says so (float32 CPU tensors, head_dim a multiple of 16)."""
    choice = os.environ.get("SPICE_FAST_TREE_ATTENTION", "auto").lower()
    if choice not in ("auto", "torch"):
        raise ValueError(f"SPICE_FAST_TREE_ATTENTION must be 'auto' or 'torch', got {choice!r}")
    return _backend == "auto" and choice == "auto" and tree_attention_supported(q, k)


def _segment_attention(q, k, v, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """Prefix-tree segments (collapsed): each node's tokens attend to its ancestors' keys and causally
    to their own; a root is one causal sequence. Work ~ sum over nodes of n * (ancestors + n), not the
    square of the segment's length of one masked call. The pieces come from one ``split`` per tensor,
    whose backward assembles the gradient in one pass (a slice's backward zero-fills a full-size tensor
    per piece)."""
    sizes: list[int] = []

    def preorder(node):
        sizes.append(node[0])
        for child in node[1]:
            preorder(child)

    for tree in batch.segments:
        preorder(tree)
    if sum(sizes) != q.shape[0]:
        raise ValueError(f"segments cover {sum(sizes)} tokens, the batch has {q.shape[0]}")
    qs, ks, vs = q.split(sizes), k.split(sizes), v.split(sizes)
    outs: list[torch.Tensor] = []
    piece = iter(range(len(sizes)))

    def attend(node, keys: list[torch.Tensor], values: list[torch.Tensor], context: int):
        i = next(piece)
        if context == 0:
            outs.append(_sdpa_causal(qs[i][None], ks[i][None], vs[i][None], scale)[0])
        else:
            mask = _causal_after(context, node[0], q.device)
            outs.append(
                _sdpa_masked(qs[i], torch.cat([*keys, ks[i]]), torch.cat([*values, vs[i]]), mask, scale)
            )
        for child in node[1]:
            attend(child, [*keys, ks[i]], [*values, vs[i]], context + node[0])

    for tree in batch.segments:
        attend(tree, [], [], 0)
    return torch.cat(outs, dim=0)


def prefill_with_context(
    q: torch.Tensor,  # [N, num_heads, D] the new tokens of each sequence, packed
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, D] (new tokens already written)
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:  # [N, num_heads, D]
    """Prefill whose sequences start after cached blocks: each new token attends to its sequence's
    context and to the new tokens up to itself, all read from the pool (PyTorch, every device)."""
    bounds = batch.cu_seqlens.tolist()
    block_size = k_cache.shape[1]
    outs = []
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        context, num_new = batch.prefix_lens[i], e - s
        total = context + num_new
        if len(batch.prefix_tables[i]) * block_size < total:
            raise ValueError(
                f"sequence {i}: {total} tokens do not fit its {len(batch.prefix_tables[i])} blocks"
            )
        table = torch.tensor(batch.prefix_tables[i], dtype=torch.long, device=q.device)
        k = k_cache[table].reshape(-1, *k_cache.shape[2:])[:total]  # [total, kv_heads, D]
        v = v_cache[table].reshape(-1, *v_cache.shape[2:])[:total]
        outs.append(_sdpa_masked(q[s:e], k, v, _causal_after(context, num_new, q.device), scale))
    return torch.cat(outs, dim=0)


def _causal_after(context: int, num_new: int, device) -> torch.Tensor:  # [num_new, context + num_new]
    """Mask of new tokens that see all ``context`` tokens before them and each other causally."""
    query_pos = torch.arange(context, context + num_new, device=device)
    return torch.arange(context + num_new, device=device)[None, :] <= query_pos[:, None]


def _sdpa_masked(
    q: torch.Tensor,  # [T, num_heads, D]
    k: torch.Tensor,  # [S, num_kv_heads, D]
    v: torch.Tensor,
    mask: torch.Tensor,  # [T, S] bool, True = attend
    scale: float,
) -> torch.Tensor:  # [T, num_heads, D]
    if q.is_cuda and q.shape[1] != k.shape[1]:
        # CUDA's memory-efficient SDPA takes a mask but not enable_gqa: give it whole K/V heads
        # (else it falls back to the math path, which stores [heads, T, S] scores)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
    )  # fmt: skip
    return out[0].transpose(0, 1)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # [B, T, heads, D] in and out; SDPA wants heads before time.
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        is_causal=True, scale=scale, enable_gqa=q.shape[2] != k.shape[2],
    )  # fmt: skip
    return out.transpose(1, 2)


def paged_decode_attention(
    q: torch.Tensor,  # [B, num_heads, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, D]
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:  # [B, num_heads, D]
    if _backend == "triton":
        return _paged_decode_kernel(
            q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale, backend="triton"
        )
    if _backend == "torch":
        return paged_decode_attention_ref(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale)
    if not q.is_cuda:
        return paged_decode_attention_cpu(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale)
    flash = _flash_fn("flash_attn_with_kvcache") if k_cache.shape[1] % 256 == 0 else None
    if flash is not None and q.dtype in (torch.float16, torch.bfloat16):
        out = flash(
            q.unsqueeze(1), k_cache, v_cache, cache_seqlens=batch.context_lens,
            block_table=batch.block_tables, softmax_scale=scale, causal=True,
        )  # fmt: skip
        return out.squeeze(1)
    return _paged_decode_kernel(q, k_cache, v_cache, batch.block_tables, batch.context_lens, scale)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        h, q_dim, kv_dim = (
            config.hidden_size,
            config.num_heads * config.head_dim,
            config.num_kv_heads * config.head_dim,
        )
        self.q_proj = Linear(h, q_dim, bias=config.qkv_bias)
        self.k_proj = Linear(h, kv_dim, bias=config.qkv_bias)
        self.v_proj = Linear(h, kv_dim, bias=config.qkv_bias)
        self.o_proj = Linear(q_dim, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = config.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [N, H]
        cos_sin: tuple[torch.Tensor, torch.Tensor],
        batch: AttentionBatch,
        kv_cache: PagedKVCache | None,
    ) -> torch.Tensor:  # [N, H]
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos_sin
        q, k = RotaryEmbedding.apply(q, cos, sin), RotaryEmbedding.apply(k, cos, sin)
        if kv_cache is not None and batch.slot_mapping is not None:
            k_pool = kv_cache.k[self.layer_idx].view(-1, self.num_kv_heads, self.head_dim)
            v_pool = kv_cache.v[self.layer_idx].view(-1, self.num_kv_heads, self.head_dim)
            k_pool[batch.slot_mapping] = k.to(k_pool.dtype)
            v_pool[batch.slot_mapping] = v.to(v_pool.dtype)
        if batch.is_decode:
            if kv_cache is None:
                raise ValueError("decode mode needs a PagedKVCache")
            out = paged_decode_attention(
                q, kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx], batch, self.scale
            )
        elif batch.prefix_lens is not None:
            if kv_cache is None:
                raise ValueError("prefill after cached blocks needs a PagedKVCache")
            out = prefill_with_context(
                q, kv_cache.k[self.layer_idx], kv_cache.v[self.layer_idx], batch, self.scale
            )
        else:
            out = packed_causal_attention(q, k, v, batch, self.scale)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))
