"""Paged KV-cache attention for one decode step.

The KV pool of one layer is ``k_cache``/``v_cache`` ``[num_blocks, block_size, num_kv_heads, head_dim]``;
sequence ``b`` owns the blocks ``block_tables[b, :ceil(context_lens[b] / block_size)]`` in order, and its
new token's K/V are already written. ``paged_decode_attention_ref`` is the definition of correct:
gather the blocks, mask past ``context_lens``, and run SDPA, which is exactly causal attention of the
last token over its sequence. Tests compare it with dense causal attention over the same tokens.
"""

import torch
import torch.nn.functional as F


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int, padded with any valid block index
    context_lens: torch.Tensor,  # [B] int, tokens each sequence attends to (its new one included)
    scale: float,
) -> torch.Tensor:  # [B, num_heads, head_dim]
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if block_tables.shape[0] != num_seqs or context_lens.shape != (num_seqs,):
        raise ValueError(
            f"block_tables {tuple(block_tables.shape)} and context_lens {tuple(context_lens.shape)} "
            f"do not match {num_seqs} sequences"
        )
    max_blocks = block_tables.shape[1]
    tables = block_tables.long()
    k = k_cache[tables].reshape(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    v = v_cache[tables].reshape(num_seqs, max_blocks * block_size, num_kv_heads, head_dim)
    group = num_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=2).transpose(1, 2)  # [B, num_heads, S, D]
    v = v.repeat_interleave(group, dim=2).transpose(1, 2)
    positions = torch.arange(max_blocks * block_size, device=q.device)
    mask = positions[None, :] < context_lens.to(q.device).long()[:, None]  # [B, S]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask[:, None, None, :], scale=scale
    )  # [B, num_heads, 1, D]
    return out.squeeze(2)
