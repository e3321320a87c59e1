"""A minimal batched generator over the model's paged-KV decode mode.

Every sequence gets its own contiguous run of KV blocks sized for prompt + max_new_tokens; prompts
are prefilled in one packed forward, then one token per live sequence is decoded per step. It is
exact (greedy output equals transformers' ``generate(do_sample=False)``, see tests/test_generate.py)
but has none of the sampler's sharing, scheduling or fused kernels: ``spice_fast.engine`` (issue 3)
replaces it for rollouts.
"""

from __future__ import annotations

import torch

from spice_fast.model import AttentionBatch, CausalLM, PagedKVCache


@torch.inference_mode()
def generate(
    model: CausalLM,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    stop_token_ids: list[int] | tuple[int, ...] = (),
    seed: int | None = None,
    block_size: int = 16,
) -> list[list[int]]:
    """New token ids for each prompt; stops at ``max_new_tokens`` or a stop token (kept)."""
    if not prompts or any(not p for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token-id lists")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if min(p) < 0 or max(p) >= vocab:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab})")
    device = model.device
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    blocks_per_seq = [-(-(len(p) + max_new_tokens) // block_size) for p in prompts]
    cache = PagedKVCache.allocate(model.config, sum(blocks_per_seq), block_size, model.dtype, device)
    starts = [sum(blocks_per_seq[:i]) for i in range(len(prompts))]
    max_blocks = max(blocks_per_seq)
    block_tables = torch.tensor(
        [[s + min(j, n - 1) for j in range(max_blocks)] for s, n in zip(starts, blocks_per_seq, strict=True)],
        dtype=torch.int32,
        device=device,
    )  # [B, max_blocks], padded with the sequence's own last block

    slots = torch.cat([s * block_size + torch.arange(len(p)) for s, p in zip(starts, prompts, strict=True)])
    batch = AttentionBatch.packed([len(p) for p in prompts], device, slot_mapping=slots.to(device))
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    hidden = model.forward_hidden(ids, batch, cache)
    last = batch.cu_seqlens[1:].long() - 1
    logits = model.logits(hidden[last])  # [B, V]

    stop = set(stop_token_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long, device=device)
    live = torch.arange(len(prompts), device=device)
    while True:
        tokens = _sample(logits, temperature, gen)
        keep = []
        for row, (seq, tok) in enumerate(zip(live.tolist(), tokens.tolist(), strict=True)):
            outputs[seq].append(tok)
            if tok not in stop and len(outputs[seq]) < max_new_tokens:
                keep.append(row)
        if not keep:
            return outputs
        keep_t = torch.tensor(keep, device=device)
        live, tokens = live[keep_t], tokens[keep_t]
        pos = lengths[live] + torch.tensor([len(outputs[s]) - 1 for s in live.tolist()], device=device)
        tables = block_tables[live]
        slot = (
            tables.gather(1, (pos // block_size)[:, None]).squeeze(1).long() * block_size + pos % block_size
        )
        batch = AttentionBatch.decode(pos, tables, (pos + 1).to(torch.int32), slot)
        logits = model.logits(model.forward_hidden(tokens, batch, cache))


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> torch.Tensor:  # [B]
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(1)
