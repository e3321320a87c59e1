"""The GRPO training loss straight from hidden states: log-probs, clipped loss and its gradient in one pass.

``fused_grpo_loss(hidden, weight, targets, old_logprobs, advantages, mask, ...)`` equals
``policy_loss(fused_linear_logprob(hidden, weight, targets), old_logprobs, advantages, mask, ...)`` in loss
and gradients, but costs one vocabulary GEMM pass plus the two gradient GEMMs (6NHV FLOPs instead of the
8NHV of recomputing logits in backward). It works because the aggregation weight of every token is known
before the pass (``grpo.token_weights``), so d loss / d logp of a row is a function of that row's logp
only: the row kernel computes the log-softmax statistics, the token's loss term and its derivative, and
overwrites the row's logits with d loss / d logits in the same program. The gradients w.r.t. hidden and
weight are then formed chunk by chunk in the forward call and only scaled by the upstream gradient in
backward (the scheme of Liger-Kernel's fused linear cross-entropy, applied to the GRPO objective).

No [N, V] tensor exists: rows go through [C, V] chunks. Backends as in ``logprob.py``.
Tested by tests/test_kernels_fused_grpo.py against the unfused composition and the references.
"""

from __future__ import annotations

import torch

from ._utils import default_block_v, default_chunk_rows, lazy_jit, pick_backend
from .grpo import NUM_STATS, metrics_from_stats, prepare_policy_inputs, token_terms_torch
from .logprob import ChunkGrads, chunk_logits, gemm_weight, logits_buffer

tl = None  # triton.language, bound by _utils.lazy_jit at the first launch (keeps the import light)


@lazy_jit
def _fused_grpo_kernel(
    logits_ptr,
    stride_logits_row,
    targets_ptr,
    old_ptr,
    adv_ptr,
    w_ptr,
    mask_ptr,
    ref_ptr,
    isw_ptr,
    logp_ptr,
    stats_ptr,
    num_cols,
    inv_temperature,
    clip_low,
    clip_high,
    kl_coef,
    BLOCK_V: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ISW: tl.constexpr,
):
    """One row: log-softmax statistics (pass 1), the token's loss term, d loss/d logits in place (pass 2)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_row
    target = tl.load(targets_ptr + row).to(tl.int64)
    z_t = tl.load(row_ptr + target).to(tl.float32) * inv_temperature
    m = float("-inf")
    s_other = 0.0
    for start in range(0, num_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = (
            tl.load(row_ptr + cols, mask=cols < num_cols, other=float("-inf")).to(tl.float32)
            * inv_temperature
        )
        m_new = tl.maximum(m, tl.max(z, axis=0))
        e = tl.exp(z - m_new)
        s_other = tl.exp(m - m_new) * s_other + tl.sum(tl.where(cols == target, 0.0, e), axis=0)
        m = m_new
    s = tl.exp(z_t - m) + s_other
    log_s = tl.log(s)
    u = 1.0 + s_other
    log1p_other = tl.where(u == 1.0, s_other, tl.log(u) * s_other / tl.where(u == 1.0, 1.0, u - 1.0))
    lp = tl.where(z_t == m, -log1p_other, (z_t - m) - log_s)
    omp = s_other / s

    # the token's clipped-policy term and its derivative (same math as grpo._policy_loss_*_kernel)
    keep = tl.load(mask_ptr + row) > 0
    old = tl.load(old_ptr + row)
    adv = tl.where(keep, tl.load(adv_ptr + row), 0.0)
    w = tl.load(w_ptr + row)
    delta = tl.where(keep, lp - old, 0.0)
    ratio = tl.exp(delta)
    clipped = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
    ratio_c = tl.minimum(tl.maximum(ratio, 1 - clip_low), 1 + clip_high)
    pg = -tl.minimum(ratio * adv, ratio_c * adv)
    dpg = tl.where(clipped, 0.0, -adv * ratio)
    if HAS_ISW:
        isw = tl.where(keep, tl.load(isw_ptr + row), 0.0)
        pg = pg * isw
        dpg = dpg * isw
    ref_kl = 0.0
    if HAS_REF:
        d = tl.where(keep, tl.load(ref_ptr + row) - lp, 0.0)
        ref_kl = tl.exp(d) - d - 1
        pg += kl_coef * ref_kl
        dpg += kl_coef * (1 - tl.exp(d))
    g = tl.where(keep, w * dpg, 0.0)
    tl.store(logp_ptr + row, lp)
    out = stats_ptr + row * 5
    tl.store(out + 0, tl.where(keep, w * pg, 0.0))
    tl.store(out + 1, tl.where(keep & clipped, 1.0, 0.0))
    tl.store(out + 2, tl.where(keep, ratio, 0.0))
    tl.store(out + 3, tl.where(keep, ratio - 1 - delta, 0.0))
    tl.store(out + 4, tl.where(keep, ref_kl, 0.0))

    for start in range(0, num_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < num_cols
        z = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        dz = tl.where(cols == target, g * omp, -g * tl.exp((z - m) - log_s))
        tl.store(row_ptr + cols, (dz * inv_temperature).to(logits_ptr.dtype.element_ty), mask=valid)


def fused_grpo_rows(logits, targets, old, adv, w, m, ref, isw, temperature, clip_low, clip_high, kl_coef):
    """Launcher: per-row logp [C] and stats [C, 5]; ``logits`` [C, V] becomes d loss/d logits."""
    num_rows, num_cols = logits.shape
    assert logits.stride(1) == 1
    logp = torch.empty(num_rows, device=logits.device, dtype=torch.float32)
    stats = torch.empty(num_rows, NUM_STATS, device=logits.device, dtype=torch.float32)
    if num_rows:
        _fused_grpo_kernel[(num_rows,)](
            logits, logits.stride(0), targets, old, adv, w, m,
            ref if ref is not None else old, isw if isw is not None else old,
            logp, stats, num_cols, 1.0 / temperature, clip_low, clip_high, kl_coef,
            BLOCK_V=default_block_v(num_cols), HAS_REF=ref is not None, HAS_ISW=isw is not None,
        )  # fmt: skip
    return logp, stats.sum(0)


def _fused_grpo_rows_torch(
    logits, targets, old, adv, w, m, ref, isw, temperature, clip_low, clip_high, kl_coef
):
    """PyTorch twin of the kernel (fp32, one [C, V] exp buffer reused as d loss/d logits)."""
    z = logits if logits.dtype == torch.float32 else logits.float()
    if temperature != 1.0:
        z.div_(temperature)
    idx = targets.long().unsqueeze(-1)
    z.sub_(z.amax(-1, keepdim=True))
    z_t = z.gather(-1, idx).squeeze(-1)
    e = z.exp_().scatter_(-1, idx, 0.0)  # exp(z - m) with the target column zeroed
    s_other = e.sum(-1)
    s = torch.exp(z_t) + s_other
    lp = torch.where(z_t == 0, -torch.log1p(s_other), z_t - torch.log(s))
    g, stats = token_terms_torch(lp, old, adv, w, m > 0, ref, isw, clip_low, clip_high, kl_coef)
    dz = e.mul_((-g / s).unsqueeze(-1)).scatter_(-1, idx, (g * s_other / s).unsqueeze(-1))
    if temperature != 1.0:
        dz.div_(temperature)
    return lp, stats, dz


class _FusedGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old, adv, w, m, ref, isw, config):
        temperature, clip_low, clip_high, kl_coef, backend, chunk = config
        num_rows = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        grads = ChunkGrads(hidden, weight, (need_h, need_w))
        weight_gemm = gemm_weight(weight, backend)
        buffer = logits_buffer(chunk, num_rows, weight_gemm)
        rows = fused_grpo_rows if backend == "triton" else _fused_grpo_rows_torch
        logp = torch.empty(num_rows, device=hidden.device, dtype=torch.float32)
        stats = torch.zeros(NUM_STATS, device=hidden.device, dtype=torch.float32)
        for start in range(0, num_rows, chunk):
            end = min(start + chunk, num_rows)
            h = hidden[start:end]
            logits = chunk_logits(h, weight_gemm, buffer)  # [C, V]
            sl = slice(start, end)
            per_row = (targets[sl], old[sl], adv[sl], w[sl], m[sl])
            opt = (None if ref is None else ref[sl], None if isw is None else isw[sl])
            if backend == "triton":
                logp[sl], chunk_stats = rows(
                    logits, *per_row, *opt, temperature, clip_low, clip_high, kl_coef
                )
                dlogits = logits
            else:
                logp[sl], chunk_stats, dlogits = rows(
                    logits, *per_row, *opt, temperature, clip_low, clip_high, kl_coef
                )
            stats += chunk_stats
            grads.add(dlogits, h, weight_gemm, start)
            del logits, dlogits
        grad_hidden, grad_weight = grads.result()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(stats, logp)
        return stats[0].clone(), stats, logp

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_logp):
        grad_hidden, grad_weight = ctx.saved_tensors
        # the usual upstream gradient is exactly 1: hand back the stored gradients without a weight-sized copy
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            if grad_hidden is not None:
                grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
            if grad_weight is not None:
                grad_weight = grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, *([None] * 8)


def fused_grpo_loss(
    hidden: torch.Tensor,  # [B, T, H] (or [T, H])
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [B, T] int; values at masked positions are ignored
    old_logprobs: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T]
    *,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    agg: str = "drgrpo",
    max_new_tokens: int | None = None,
    is_weights: torch.Tensor | None = None,
    backend: str | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (scalar fp32) and metrics as ``policy_loss``, plus ``metrics["logprobs"]`` (detached, [B, T])."""
    if hidden.dim() < 2 or hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"hidden must be targets.shape + (H,), got {tuple(hidden.shape)} and {tuple(targets.shape)}"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, {hidden.shape[-1]}], got {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    old, adv, w, m, ref, isw = prepare_policy_inputs(
        targets.shape, old_logprobs, advantages, mask, ref_logprobs, kl_coef, is_weights, agg, max_new_tokens
    )
    vocab = weight.shape[0]
    flat_targets = torch.where(m > 0, targets.reshape(-1).long(), 0).contiguous()
    if flat_targets.numel() and (int(flat_targets.min()) < 0 or int(flat_targets.max()) >= vocab):
        raise ValueError(f"unmasked targets must lie in [0, {vocab})")
    h2 = hidden.reshape(-1, hidden.shape[-1])
    chosen = pick_backend(backend, hidden, weight)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = chunk_size or default_chunk_rows(h2.shape[0], vocab, chosen)
    config = (float(temperature), float(clip_low), float(clip_high), float(kl_coef), chosen, chunk)
    loss, stats, logp = _FusedGRPOLoss.apply(h2, weight, flat_targets, old, adv, w, m, ref, isw, config)
    metrics = metrics_from_stats(stats, m, ref is not None)
    metrics["logprobs"] = logp.view(targets.shape)
    return loss, metrics
