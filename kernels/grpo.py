"""GRPO advantages and the clipped policy loss (Dr. GRPO by default), forward and backward in Triton.

``grpo_advantages`` centres each reward on its group's mean (Dr. GRPO), optionally divides by the
group's std (GRPO); groups are arbitrary integer ids. ``policy_loss`` is, per token,
``-min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) * is_weight + kl_coef * k3(ref, logp)`` with
``r = exp(logp - old)`` and ``k3 = exp(ref - logp) - (ref - logp) - 1``, aggregated as
``"drgrpo"`` (sum / (num_sequences * max_new_tokens)), ``"token_mean"`` (DAPO) or
``"seq_mean_token_mean"`` (original GRPO). Truncated importance weights multiply the policy-gradient
term only, as in verl's TIS. The ``_ref`` functions are the definition of correct (plain autograd);
``policy_loss`` computes the analytic per-token gradient, with Triton kernels or a PyTorch path.
Tested by tests/test_kernels_grpo.py.
"""

from __future__ import annotations

import torch

from ._utils import lazy_jit, pick_backend

tl = None  # triton.language, bound by _utils.lazy_jit at the first launch (keeps the import light)

AGGREGATIONS = ("drgrpo", "token_mean", "seq_mean_token_mean")
NUM_STATS = 5  # loss, clipped tokens, sum of ratios, sum of approx KL(old || new), sum of k3(ref, new)


def grpo_advantages_ref(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale_by_std=False, eps=1e-6):
    """One group at a time: reward minus the group mean, optionally / (unbiased group std + eps)."""
    out = torch.empty(rewards.shape, dtype=torch.promote_types(rewards.dtype, torch.float32))
    for gid in group_ids.unique():
        idx = group_ids == gid
        r = rewards[idx].to(out.dtype)
        adv = r - r.mean()
        if scale_by_std:
            std = r.std() if r.numel() > 1 else r.new_zeros(())
            adv = adv / (std + eps)
        out[idx] = adv
    return out.to(rewards.device)


def grpo_advantages(
    rewards: torch.Tensor,  # [S] float
    group_ids: torch.Tensor,  # [S] int, any values
    *,
    scale_by_std: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:  # [S] fp32
    """Per-sample advantages in a few vectorised ops (segment sums over the group index)."""
    if rewards.dim() != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            "rewards and group_ids must be 1-D of one length, "
            f"got {tuple(rewards.shape)}, {tuple(group_ids.shape)}"
        )
    if group_ids.dtype.is_floating_point:
        raise TypeError(f"group_ids must be integers, got {group_ids.dtype}")
    if not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be floating point, got {rewards.dtype}")
    r = rewards.float()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inverse.max()) + 1 if inverse.numel() else 0
    count = torch.bincount(inverse, minlength=num_groups).float()
    mean = torch.zeros(num_groups, device=r.device).index_add_(0, inverse, r) / count
    adv = r - mean[inverse]
    if scale_by_std:
        sq = torch.zeros(num_groups, device=r.device).index_add_(0, inverse, adv * adv)
        std = torch.sqrt(sq / (count - 1).clamp(min=1))  # unbiased, as torch.std; 0 for a group of one
        adv = adv / (std[inverse] + eps)
    return adv


def token_weights(mask: torch.Tensor, agg: str, max_new_tokens: int | None) -> torch.Tensor:
    """[B, T] fp32 weights w so that loss = sum(w * token_loss) for the chosen aggregation."""
    m = mask.float()
    num_seqs, seq_len = m.shape
    if agg == "drgrpo":
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        return m / float(num_seqs * (max_new_tokens or seq_len))
    if agg == "token_mean":
        return m / m.sum().clamp(min=1.0)
    if agg == "seq_mean_token_mean":
        return m / (num_seqs * m.sum(-1, keepdim=True).clamp(min=1.0))
    raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")


def policy_loss_ref(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_low=0.2,
    clip_high=0.2,
    ref_logprobs=None,
    kl_coef=0.0,
    agg="drgrpo",
    max_new_tokens=None,
    is_weights=None,
):
    """Plain autograd, written as the papers state it. Returns (loss, metrics)."""
    lp = logprobs if logprobs.dim() == 2 else logprobs.unsqueeze(0)
    shape = lp.shape
    old = old_logprobs.reshape(shape)
    m = mask.reshape(shape).to(lp.dtype)
    adv = advantages.to(lp.dtype)
    adv = adv.unsqueeze(-1) if adv.dim() == 1 and adv.numel() == shape[0] else adv.reshape(shape)
    keep = m > 0
    ratio = torch.exp(torch.where(keep, lp - old, 0))
    pg = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)
    if is_weights is not None:
        pg = pg * is_weights.reshape(shape).to(lp.dtype)
    per_token = pg
    if ref_logprobs is not None and kl_coef != 0.0:
        d = torch.where(keep, ref_logprobs.reshape(shape).to(lp.dtype) - lp, 0)
        per_token = per_token + kl_coef * (torch.exp(d) - d - 1)
    per_token = torch.where(keep, per_token, 0) * m
    if agg == "drgrpo":
        loss = per_token.sum() / (shape[0] * (max_new_tokens or shape[1]))
    elif agg == "token_mean":
        loss = per_token.sum() / m.sum().clamp(min=1)
    elif agg == "seq_mean_token_mean":
        loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1)).mean()
    else:
        raise ValueError(f"agg must be one of {AGGREGATIONS}, got {agg!r}")
    with torch.no_grad():
        count = keep.sum().clamp(min=1)
        clipped = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
        delta = torch.where(keep, lp - old, 0)
        metrics = {
            "clip_fraction": (clipped & keep).sum() / count,
            "mean_ratio": torch.where(keep, ratio, 0).sum() / count,
            "approx_kl": torch.where(keep, ratio - 1 - delta, 0).sum() / count,
        }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------
# Triton: one program per BLOCK tokens; forward writes per-block partial sums (summed in a fixed order,
# so the loss is deterministic), backward recomputes the per-token derivative.


@lazy_jit
def _policy_loss_fwd_kernel(
    lp_ptr,
    old_ptr,
    adv_ptr,
    w_ptr,
    mask_ptr,
    ref_ptr,
    isw_ptr,
    partial_ptr,
    num_tokens,
    clip_low,
    clip_high,
    kl_coef,
    BLOCK: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ISW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < num_tokens
    keep = tl.load(mask_ptr + offs, mask=inb, other=0.0) > 0
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    adv = tl.where(keep, tl.load(adv_ptr + offs, mask=inb, other=0.0), 0.0)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    delta = tl.where(keep, lp - old, 0.0)
    ratio = tl.exp(delta)
    clipped = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
    ratio_c = tl.minimum(tl.maximum(ratio, 1 - clip_low), 1 + clip_high)
    pg = -tl.minimum(ratio * adv, ratio_c * adv)
    if HAS_ISW:
        pg = pg * tl.where(keep, tl.load(isw_ptr + offs, mask=inb, other=0.0), 0.0)
    ref_kl = tl.zeros([BLOCK], tl.float32)
    if HAS_REF:
        d = tl.where(keep, tl.load(ref_ptr + offs, mask=inb, other=0.0) - lp, 0.0)
        ref_kl = tl.exp(d) - d - 1
        pg += kl_coef * ref_kl
    row = partial_ptr + pid * 5
    tl.store(row + 0, tl.sum(tl.where(keep, w * pg, 0.0), axis=0))
    tl.store(row + 1, tl.sum(tl.where(keep & clipped, 1.0, 0.0), axis=0))
    tl.store(row + 2, tl.sum(tl.where(keep, ratio, 0.0), axis=0))
    tl.store(row + 3, tl.sum(tl.where(keep, ratio - 1 - delta, 0.0), axis=0))
    tl.store(row + 4, tl.sum(tl.where(keep, ref_kl, 0.0), axis=0))


@lazy_jit
def _policy_loss_bwd_kernel(
    grad_loss_ptr,
    lp_ptr,
    old_ptr,
    adv_ptr,
    w_ptr,
    mask_ptr,
    ref_ptr,
    isw_ptr,
    grad_lp_ptr,
    num_tokens,
    clip_low,
    clip_high,
    kl_coef,
    BLOCK: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ISW: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    inb = offs < num_tokens
    keep = tl.load(mask_ptr + offs, mask=inb, other=0.0) > 0
    lp = tl.load(lp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    adv = tl.where(keep, tl.load(adv_ptr + offs, mask=inb, other=0.0), 0.0)
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    ratio = tl.exp(tl.where(keep, lp - old, 0.0))
    clipped = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
    dpg = tl.where(clipped, 0.0, -adv * ratio)  # d/dlogp of -min(r A, clip(r) A)
    if HAS_ISW:
        dpg = dpg * tl.where(keep, tl.load(isw_ptr + offs, mask=inb, other=0.0), 0.0)
    if HAS_REF:
        d = tl.where(keep, tl.load(ref_ptr + offs, mask=inb, other=0.0) - lp, 0.0)
        dpg += kl_coef * (1 - tl.exp(d))
    g = tl.load(grad_loss_ptr).to(tl.float32)
    tl.store(grad_lp_ptr + offs, tl.where(keep, g * w * dpg, 0.0), mask=inb)


def token_terms_torch(lp, old, adv, w, keep, ref, isw, clip_low, clip_high, kl_coef):
    """PyTorch twin of the kernels on flat fp32 tokens: (weighted loss terms, d loss/d logp, stats [5])."""
    delta = torch.where(keep, lp - old, 0.0)
    ratio = torch.exp(delta)
    adv = torch.where(keep, adv, 0.0)
    clipped = ((ratio > 1 + clip_high) & (adv > 0)) | ((ratio < 1 - clip_low) & (adv < 0))
    pg = -torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    dpg = torch.where(clipped, 0.0, -adv * ratio)
    if isw is not None:
        isw = torch.where(keep, isw, 0.0)
        pg, dpg = pg * isw, dpg * isw
    ref_kl = torch.zeros_like(lp)
    if ref is not None:
        d = torch.where(keep, ref - lp, 0.0)
        ref_kl = torch.exp(d) - d - 1
        pg = pg + kl_coef * ref_kl
        dpg = dpg + kl_coef * (1 - torch.exp(d))
    zero = torch.zeros_like(lp)
    stats = torch.stack(
        [
            torch.where(keep, w * pg, zero).sum(),
            (keep & clipped).sum().float(),
            torch.where(keep, ratio, zero).sum(),
            torch.where(keep, ratio - 1 - delta, zero).sum(),
            torch.where(keep, ref_kl, zero).sum(),
        ]
    )
    return torch.where(keep, w * dpg, zero), stats


def prepare_policy_inputs(
    logprobs_shape, old_logprobs, advantages, mask, ref_logprobs, kl_coef, is_weights, agg, max_new_tokens
):
    """Checks shapes; returns flat contiguous fp32 (old, adv, w, mask, ref | None, isw | None)."""
    shape = torch.Size(logprobs_shape)
    if len(shape) not in (1, 2):
        raise ValueError(f"logprobs must be [B, T] or [T], got shape {tuple(shape)}")
    shape2 = shape if len(shape) == 2 else torch.Size([1, shape[0]])
    for name, t in (
        ("old_logprobs", old_logprobs),
        ("mask", mask),
        ("ref_logprobs", ref_logprobs),
        ("is_weights", is_weights),
    ):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} must have the logprobs shape {tuple(shape)}, got {tuple(t.shape)}")
    if advantages.shape == shape:
        adv = advantages.reshape(shape2)
    elif advantages.dim() == 1 and advantages.shape[0] == shape2[0]:
        adv = advantages.unsqueeze(-1).expand(shape2)
    else:
        raise ValueError(
            f"advantages must be [B] or [B, T] for logprobs {tuple(shape)}, got {tuple(advantages.shape)}"
        )
    if ref_logprobs is None and kl_coef != 0.0:
        raise ValueError(f"kl_coef={kl_coef} needs ref_logprobs")
    m = mask.reshape(shape2)
    w = token_weights(m, agg, max_new_tokens)

    def flat(t):
        return None if t is None else t.reshape(shape2).float().contiguous().view(-1)

    use_ref = ref_logprobs is not None and kl_coef != 0.0
    return (
        flat(old_logprobs),
        flat(adv),
        w.contiguous().view(-1),
        flat(m),
        flat(ref_logprobs) if use_ref else None,
        flat(is_weights),
    )


def metrics_from_stats(
    stats: torch.Tensor, mask_flat: torch.Tensor, has_ref: bool
) -> dict[str, torch.Tensor]:
    count = (mask_flat > 0).sum().clamp(min=1).float()
    out = {"clip_fraction": stats[1] / count, "mean_ratio": stats[2] / count, "approx_kl": stats[3] / count}
    if has_ref:
        out["ref_kl"] = stats[4] / count
    return out


class _PolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lp, old, adv, w, m, ref, isw, clip_low, clip_high, kl_coef, backend):
        flat_lp = lp.float().contiguous().view(-1)
        keep = m > 0
        if backend == "triton":
            num_tokens, block = flat_lp.numel(), 1024
            num_blocks = max(1, -(-num_tokens // block))
            partial = torch.zeros(num_blocks, NUM_STATS, device=lp.device, dtype=torch.float32)
            args = (flat_lp, old, adv, w, m, ref if ref is not None else old, isw if isw is not None else old)
            _policy_loss_fwd_kernel[(num_blocks,)](
                *args, partial, num_tokens, clip_low, clip_high, kl_coef,
                BLOCK=block, HAS_REF=ref is not None, HAS_ISW=isw is not None,
            )  # fmt: skip
            stats = partial.sum(0)
            ctx.save_for_backward(flat_lp, old, adv, w, m, ref, isw)
        else:
            grad, stats = token_terms_torch(
                flat_lp, old, adv, w, keep, ref, isw, clip_low, clip_high, kl_coef
            )
            ctx.save_for_backward(grad)
        ctx.config = (lp.shape, lp.dtype, clip_low, clip_high, kl_coef, backend)
        ctx.mark_non_differentiable(stats)
        return stats[0].clone(), stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        shape, dtype, clip_low, clip_high, kl_coef, backend = ctx.config
        if backend == "triton":
            flat_lp, old, adv, w, m, ref, isw = ctx.saved_tensors
            grad = torch.empty_like(flat_lp)
            num_tokens, block = flat_lp.numel(), 1024
            args = (flat_lp, old, adv, w, m, ref if ref is not None else old, isw if isw is not None else old)
            _policy_loss_bwd_kernel[(max(1, -(-num_tokens // block)),)](
                grad_loss.float().contiguous(), *args, grad, num_tokens, clip_low, clip_high, kl_coef,
                BLOCK=block, HAS_REF=ref is not None, HAS_ISW=isw is not None,
            )  # fmt: skip
        else:
            (grad,) = ctx.saved_tensors
            grad = grad * grad_loss.float()
        return grad.view(shape).to(dtype), *([None] * 10)


def policy_loss(
    logprobs: torch.Tensor,  # [B, T] (or [T]), differentiable
    old_logprobs: torch.Tensor,  # [B, T]
    advantages: torch.Tensor,  # [B] or [B, T]
    mask: torch.Tensor,  # [B, T] bool or 0/1
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    agg: str = "drgrpo",
    max_new_tokens: int | None = None,
    is_weights: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped policy loss (scalar fp32) and metrics (clip_fraction, approx_kl, mean_ratio[, ref_kl]).

    Equivalent to ``policy_loss_ref``; masked tokens contribute nothing, whatever their values.
    """
    if not (0 <= clip_low < 1 and clip_high >= 0):
        raise ValueError(f"need 0 <= clip_low < 1 and clip_high >= 0, got {clip_low}, {clip_high}")
    old, adv, w, m, ref, isw = prepare_policy_inputs(
        logprobs.shape, old_logprobs, advantages, mask, ref_logprobs, kl_coef, is_weights, agg, max_new_tokens
    )
    chosen = pick_backend(backend, logprobs)
    loss, stats = _PolicyLoss.apply(
        logprobs, old, adv, w, m, ref, isw, float(clip_low), float(clip_high), float(kl_coef), chosen
    )
    return loss, metrics_from_stats(stats, m, ref is not None)
