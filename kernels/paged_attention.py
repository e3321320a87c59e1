"""Paged KV-cache attention for one decode step.

The KV pool of one layer is ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``;
sequence ``b`` owns the blocks ``block_tables[b, :ceil(context_lens[b] / block_size)]`` in order, and its
new token's K/V are already written.

* ``paged_decode_attention_ref``: the definition of correct. Gather the blocks, mask past
  ``context_lens``, run SDPA: exactly causal attention of the last token over its sequence.
* ``paged_decode_attention_cpu``: a C++ kernel (``csrc/attention``, module
  ``spice_fast._cpu_attention``) for float32 / bfloat16 CPU tensors. It reads the blocks in place
  (the reference copies every block of every sequence, every layer, every step), handles the grouped
  query heads of a KV head together with an fp32 online softmax, and runs over torch's intra-op
  thread count. Falls back to the reference where the extension is not built.
* ``paged_decode_attention``: the launcher. Triton on CUDA tensors (or on CPU tensors under
  ``TRITON_INTERPRET=1`` when forced), the reference otherwise. One program per (sequence, KV head,
  split of the KV length): the grouped query heads of a KV head are handled together, so each K/V
  element is read once; 64 positions per step are gathered through the block table (several pages
  at once) into tensor-core dots with fp32 accumulation, and the online softmax is fp32. With several
  splits a second kernel merges the partial results (log-sum-exp weighting).

tests/test_paged_attention.py compares the kernel with the reference on odd shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import lazy_jit, next_pow2, pick_backend

tl = None  # triton.language, bound by _utils.lazy_jit at the first launch


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int, padded with any valid block index
    context_lens: torch.Tensor,  # [B] int, tokens each sequence attends to (its new one included)
    scale: float,
) -> torch.Tensor:  # [B, num_heads, head_dim]
    _check(q, k_cache, v_cache, block_tables, context_lens)
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_blocks = block_tables.shape[1]
    tables = block_tables.long()
    k = k_cache[tables].reshape(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    v = v_cache[tables].reshape(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    positions = torch.arange(max_blocks * block_size, device=q.device)
    mask = positions[None, :] < context_lens.to(q.device).long()[:, None]  # [B, S]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    )  # [B, num_heads, 1, D]
    return out.squeeze(2)


_cpu_ext: list = []  # [module or None], filled on first use


def cpu_kernel_available() -> bool:
    """Whether the C++ CPU decode kernel is built (it is part of ``pip install .``)."""
    if not _cpu_ext:
        try:
            from spice_fast import _cpu_attention
        except ImportError:
            _cpu_attention = None
        _cpu_ext.append(_cpu_attention)
    return _cpu_ext[0] is not None


def paged_decode_attention_cpu(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:  # [B, num_heads, head_dim], q's dtype
    """The C++ kernel on CPU tensors; the reference for other dtypes or when it is not built."""
    if q.is_cuda or k_cache.is_cuda:
        raise ValueError(f"paged_decode_attention_cpu takes CPU tensors, got q on {q.device}")
    dtype = k_cache.dtype
    if not cpu_kernel_available() or dtype not in (torch.float32, torch.bfloat16) or v_cache.dtype != dtype:
        return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
    _check(q, k_cache, v_cache, block_tables, context_lens)
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_decode_attention_cpu needs contiguous k_cache and v_cache")
    num_seqs, num_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads, _ = k_cache.shape
    q = q.to(dtype).contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty(q.shape, dtype=torch.float32)
    _cpu_ext[0].paged_decode(
        out.data_ptr(), q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
        lens.data_ptr(), num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size,
        tables.shape[1], tables.stride(0), scale, 0 if dtype == torch.float32 else 1, torch.get_num_threads(),
    )  # fmt: skip
    return out.to(dtype)


def _check(q, k_cache, v_cache, block_tables, context_lens) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [B, H, D] and equal caches [blocks, block_size, kv_heads, D], got q "
            f"{tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}"
        )
    num_seqs, num_heads, head_dim = q.shape
    if k_cache.shape[3] != head_dim or num_heads % k_cache.shape[2]:
        raise ValueError(
            f"q has {num_heads} heads of {head_dim}; the cache has {k_cache.shape[2]} KV heads of "
            f"{k_cache.shape[3]} (num_heads must be a multiple of num_kv_heads)"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
            f"do not match {num_seqs} sequences"
        )


@lazy_jit
def _paged_decode_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, l_ptr,
    stride_q_seq, stride_q_head,
    stride_k_block, stride_k_tok, stride_k_head,
    stride_table_seq,
    stride_o_seq, stride_o_head, stride_o_split,
    stride_m_seq, stride_m_head,
    scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGES_PER_SPLIT: tl.constexpr, NORMALIZE: tl.constexpr, FP32: tl.constexpr,
):  # fmt: skip
    """One (sequence, KV head, split): BLOCK_N positions per step, gathered from their pages through the
    block table, so a step reads several pages at once. Scores and P @ V are tensor-core dots with fp32
    accumulation; the query heads of the group are the rows (padded to BLOCK_G >= 16, as dots need).
    16-bit caches: P goes in as two 16-bit terms (hi + lo), so the probabilities keep about 16 bits
    instead of the 8 of one bf16 rounding. FP32 (fp32 caches, and every cache under Triton's CPU
    interpreter, whose 16-bit dots return garbage): IEEE fp32 dots."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    ctx = tl.load(lens_ptr + seq).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kv_head * GROUP + offs_g  # query heads sharing this KV head
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_q_seq + heads[:, None] * stride_q_head + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )  # [BLOCK_G, BLOCK_D]
    q = q.to(tl.float32) if FP32 else q.to(k_ptr.dtype.element_ty)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    first = split * (PAGES_PER_SPLIT * BLOCK_SIZE)
    # Table entries past the context are never read: they may hold anything.
    last = tl.minimum(first + PAGES_PER_SPLIT * BLOCK_SIZE, ctx)
    for start in range(first, last, BLOCK_N):
        pos = start + offs_n  # [BLOCK_N]
        n_mask = pos < last
        block = tl.load(tables_ptr + seq * stride_table_seq + pos // BLOCK_SIZE, mask=n_mask, other=0)
        row = (
            block.to(tl.int64) * stride_k_block + (pos % BLOCK_SIZE) * stride_k_tok + kv_head * stride_k_head
        )
        kv_off = row[:, None] + offs_d[None, :]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
        if FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(n_mask[None, :], scores * scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        # Every step holds a valid position, so m stays finite; the guard keeps exp() finite regardless.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        prob = tl.exp(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc = acc * alpha[:, None]
        if FP32:
            acc = tl.dot(prob, v, acc, input_precision="ieee")
        else:
            p_hi = prob.to(v.dtype)
            p_lo = (prob - p_hi.to(tl.float32)).to(v.dtype)
            acc = tl.dot(p_lo, v, tl.dot(p_hi, v, acc))
        m_i = m_new
    out_off = seq * stride_o_seq + heads[:, None] * stride_o_head + split * stride_o_split + offs_d[None, :]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if NORMALIZE:
        tl.store(out_ptr + out_off, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptr + out_off, acc, mask=out_mask)
        ml_off = seq * stride_m_seq + heads * stride_m_head + split
        tl.store(m_ptr + ml_off, m_i, mask=g_mask)
        tl.store(l_ptr + ml_off, l_i, mask=g_mask)


@lazy_jit
def _merge_splits_kernel(
    part_ptr, m_ptr, l_ptr, out_ptr,
    stride_p_row, stride_o_row,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # one (sequence, query head)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    m = tl.load(m_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    l_part = tl.load(l_ptr + row * NUM_SPLITS + offs_s, mask=s_mask, other=0.0)
    m_max = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_max))  # [BLOCK_S]
    parts = tl.load(
        part_ptr + row * stride_p_row + offs_s[:, None] * HEAD_DIM + offs_d[None, :],
        mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    out = tl.sum(parts * w[:, None], axis=0) / tl.sum(l_part * w, axis=0)
    tl.store(out_ptr + row * stride_o_row + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def decode_meta(group: int, head_dim: int, block_size: int, pages_per_split: int, fp32: bool) -> dict:
    """The decode kernel's constexprs: the query heads of a group are the rows of the dots, padded to
    16 (the smallest MMA tile); 64 positions per step, 32 for head_dim over 128 (registers)."""
    block_d = max(16, next_pow2(head_dim))
    return dict(
        GROUP=group, HEAD_DIM=head_dim, BLOCK_SIZE=block_size,
        BLOCK_G=max(16, next_pow2(group)), BLOCK_D=block_d, BLOCK_N=64 if block_d <= 128 else 32,
        PAGES_PER_SPLIT=pages_per_split, FP32=fp32,
    )  # fmt: skip


def _num_splits(q: torch.Tensor, num_kv_heads: int, max_blocks: int) -> int:
    if not q.is_cuda:
        return 1
    # Enough programs to cover the GPU four times over when there are few sequences.
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    programs = q.shape[0] * num_kv_heads
    return max(1, min(max_blocks, -(-4 * sms // programs), 64))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:  # [B, num_heads, head_dim]
    """Decode attention over a paged KV cache; see the module docstring for the dispatch."""
    if pick_backend(backend, q, k_cache) == "torch":
        return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
    _check(q, k_cache, v_cache, block_tables, context_lens)
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("q, k_cache and v_cache need a contiguous last dimension and equal cache strides")
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_blocks = block_tables.shape[1]
    splits = num_splits or _num_splits(q, num_kv_heads, max_blocks)
    splits = max(1, min(splits, max_blocks))
    pages_per_split = -(-max_blocks // splits)
    splits = -(-max_blocks // pages_per_split)
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    # Triton's CPU interpreter truncates fp32 -> bf16/fp16 stores instead of rounding to nearest as GPUs
    # do; there the kernel writes fp32 and PyTorch rounds, so tests see the GPU's numerics.
    out_dtype = q.dtype if q.is_cuda else torch.float32
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    # Triton's CPU interpreter returns garbage from 16-bit dots: fp32 there
    fp32 = k_cache.dtype == torch.float32 or not q.is_cuda
    meta = decode_meta(num_heads // num_kv_heads, head_dim, block_size, pages_per_split, fp32)
    grid = (num_seqs, num_kv_heads, splits)
    if splits == 1:
        _paged_decode_kernel[grid](
            q, k_cache, v_cache, tables, lens, out, out, out,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            tables.stride(0), out.stride(0), out.stride(1), 0, 0, 0, scale, NORMALIZE=True, **meta,
        )  # fmt: skip
        return out.to(q.dtype)
    part = torch.empty(num_seqs, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    m = torch.empty(num_seqs, num_heads, splits, dtype=torch.float32, device=q.device)
    l_sum = torch.empty_like(m)
    _paged_decode_kernel[grid](
        q, k_cache, v_cache, tables, lens, part, m, l_sum,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        tables.stride(0), part.stride(0), part.stride(1), part.stride(2), m.stride(0), m.stride(1), scale,
        NORMALIZE=False, **meta,
    )  # fmt: skip
    _merge_splits_kernel[(num_seqs * num_heads,)](
        part, m, l_sum, out, part.stride(1), head_dim,
        NUM_SPLITS=splits, HEAD_DIM=head_dim, BLOCK_S=next_pow2(splits), BLOCK_D=next_pow2(head_dim),
    )  # fmt: skip
    return out.to(q.dtype)
