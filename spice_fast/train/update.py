"""The policy update: packed micro-batches, the fused GRPO loss, AdamW with fp32 master weights.

``policy_update(model, optimizer, sequences, config, lr)`` is one Dr. GRPO step over the sequences of
both roles:

* Sequences are packed (prompt + completion, no padding) into micro-batches of at most
  ``loss.micro_batch_tokens`` tokens; ``model.forward_hidden`` runs one varlen causal pass per
  micro-batch and only the rows that predict completion tokens go to ``fused_grpo_loss`` (the prompt
  rows never touch the vocabulary GEMM).
* Every aggregation is written as ``sum(weight * token_loss) / D`` with a constant known before the
  pass, so micro-batches add their gradients exactly: ``drgrpo`` D = num_sequences * max_new_tokens,
  ``token_mean`` D = the step's completion tokens, ``seq_mean_token_mean`` D = num_sequences with
  per-token weights 1 / len(sequence). Sequences with advantage 0 add nothing and are skipped (they
  still count in D).
* Old logprobs: the sampler's (default), or a no-grad recompute pass (``loss.old_logprobs=recompute``)
  with optional truncated importance weights ``min(exp(recomputed - sampler), tis_cap)``.
* A non-finite loss or gradient norm skips the optimizer step (gradients are dropped): the weights
  are never touched by a NaN.
* Replay (``loss.replay_activations``, float32 CPU): the rows whose layer products the sampler
  recorded (``Sequence.record``: the prompt's in prefill, the completion's in the decode steps) take
  them from the record in the forward instead of multiplying again (spice_fast.model.replay); rows
  without a record are computed.

``MasterAdamW`` keeps fp32 master weights when the model is bf16/fp16 (the sampler reads the low
precision parameters, updated in place from the masters) and is a plain AdamW for fp32 models.
Under FSDP2 (``optim.fsdp``) the layers' parameters, masters and moments are sharded DTensors; the
optimizer's state dict is still the whole, plain one, so any number of ranks can load it.
Tested by tests/test_train.py (packed update = per-sequence reference, skip on NaN, master weights).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from spice_fast.kernels import fused_grpo_loss, fused_linear_logprob
from spice_fast.model import AttentionBatch, CausalLM
from spice_fast.model.replay import Replay, prefix_keys
from spice_fast.train.config import TrainConfig
from spice_fast.train.distributed import (
    SINGLE,
    DistContext,
    LayerSharding,
    all_reduce_grads,
    all_reduce_sum,
    all_true,
    full_tensor,
    shard_like,
)
from spice_fast.train.rollout import Sequence


class MasterAdamW:
    """AdamW over fp32 masters of low-precision parameters (or over fp32 parameters directly).

    ``shard=True`` (under torchrun) partitions AdamW's moments over the ranks with torch's
    ``ZeroRedundancyOptimizer`` (ZeRO stage 1): each rank updates its share of the parameters and
    broadcasts them. Parameters stay whole on every rank because each rank's sampler reads them.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        *,
        lr: float,
        betas,
        eps: float,
        weight_decay: float,
        shard: bool = False,
    ):
        self.params = [p for p in params if p.requires_grad]
        self.use_masters = any(p.dtype != torch.float32 for p in self.params)
        if self.use_masters:
            self.masters = [p.detach().float().clone() for p in self.params]
            targets = self.masters
        else:
            self.masters = None
            targets = self.params
        kwargs = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        if not any(isinstance(t, DTensor) for t in targets) and all(
            t.device.type in ("cpu", "cuda") for t in targets
        ):
            kwargs["fused"] = True  # one vectorized pass per tensor: 6x torch's default step on a CPU
        self.sharded = shard
        if shard:
            from torch.distributed.optim import ZeroRedundancyOptimizer

            self.optimizer = ZeroRedundancyOptimizer(targets, optimizer_class=torch.optim.AdamW, **kwargs)
        else:
            self.optimizer = torch.optim.AdamW(targets, **kwargs)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None
        if self.masters is not None:
            for m in self.masters:
                m.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if self.masters is None:
            self.optimizer.step()
            return
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        for p, m in zip(self.params, self.masters, strict=True):
            p.copy_(m)  # in place: the sampler keeps reading the same tensors

    def state_dict(self) -> dict[str, Any]:
        """The whole state (a plain AdamW state dict, also when sharded). Sharded: a collective call,
        and only rank 0 gets the optimizer's part (the others get None there)."""
        if self.sharded:
            import torch.distributed as dist

            self.optimizer.consolidate_state_dict(to=0)
            optimizer = self.optimizer.state_dict() if dist.get_rank() == 0 else None
        else:
            optimizer = self.optimizer.state_dict()
            optimizer["state"] = {  # FSDP2 shards: gathered (every rank takes part)
                i: {k: full_tensor(v) for k, v in entry.items()} for i, entry in optimizer["state"].items()
            }
        masters = None if self.masters is None else [full_tensor(m) for m in self.masters]
        return {"optimizer": optimizer, "masters": masters}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        masters = state.get("masters")
        if (masters is None) != (self.masters is None) or (
            masters is not None and len(masters) != len(self.masters)
        ):
            raise ValueError("optimizer state: saved for a model of another precision or parameter count")
        if masters is not None:
            with torch.no_grad():
                for m, saved in zip(self.masters, masters, strict=True):
                    if m.shape != saved.shape:
                        raise ValueError(
                            f"optimizer state: master of shape {tuple(saved.shape)}, want {tuple(m.shape)}"
                        )
                    m.copy_(shard_like(saved, m))
        optimizer = state["optimizer"]
        targets = self.masters if self.masters is not None else self.params
        if not self.sharded:  # FSDP2: each rank keeps its shard of the whole saved state
            optimizer = {
                **optimizer,
                "state": {
                    i: {
                        k: shard_like(v, targets[i])
                        if isinstance(v, torch.Tensor) and v.shape == targets[i].shape
                        else v
                        for k, v in entry.items()
                    }
                    for i, entry in optimizer["state"].items()
                },
            }
        # the step implementation is this optimizer's choice (fused or not), not the saver's
        fused = self.optimizer.param_groups[0].get("fused")
        optimizer = {**optimizer, "param_groups": [{**g, "fused": fused} for g in optimizer["param_groups"]]}
        self.optimizer.load_state_dict(optimizer)


def make_optimizer(model: CausalLM, config: TrainConfig, ctx: DistContext = SINGLE) -> MasterAdamW:
    o = config.optim
    return MasterAdamW(
        list(model.parameters()), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay,
        shard=o.shard_state and ctx.enabled,
    )  # fmt: skip


def learning_rate(config: TrainConfig, step: int) -> float:
    """Constant after a linear warmup; ``step`` counts from 1."""
    warmup = config.optim.warmup_steps
    return config.optim.lr * (min(1.0, step / warmup) if warmup else 1.0)


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped in order into bins of at most ``budget`` tokens (a longer item gets its own bin)."""
    bins: list[list[int]] = []
    used = budget
    for i, n in enumerate(lengths):
        if used + n > budget:
            bins.append([])
            used = 0
        bins[-1].append(i)
        used += n
    return bins


@dataclass
class _MicroBatch:
    input_ids: torch.Tensor  # [N] the packed inputs: prompt + completion[:-1], shared prefixes once
    batch: AttentionBatch
    rows: torch.Tensor  # [M] positions that predict completion tokens (a shared row may repeat)
    targets: torch.Tensor  # [M] completion tokens
    sampler_logprobs: torch.Tensor  # [M]
    advantages: torch.Tensor  # [M] each sequence's advantage on its tokens
    weights: torch.Tensor  # [M] aggregation weight (1, or 1/len for seq_mean_token_mean)
    replay: Replay | None = None  # rows (prompt and completion) whose products the sampler recorded


@dataclass
class _Unit:
    """Sequences packed as one segment, a two-level prefix tree: their common prefix once, then the
    rest of the prompt once per distinct prompt (the answer-type part of a document's challenger
    prompts; a prompt of a single sequence stays in its branch), then each one's completion."""

    seqs: list[Sequence]
    prefix_len: int

    def prompt_groups(self) -> list[list[Sequence]]:
        """The sequences grouped by prompt, in order of first appearance."""
        groups: dict[tuple[int, ...], list[Sequence]] = {}
        for s in self.seqs:
            groups.setdefault(tuple(s.prompt_ids), []).append(s)
        return list(groups.values())

    @property
    def num_tokens(self) -> int:
        p = self.prefix_len
        total = p
        for group in self.prompt_groups():
            shared = len(group[0].prompt_ids) - p if len(group) > 1 else 0
            total += shared + sum(_input_len(s) - p - shared for s in group)
        return total


def _input_len(s: Sequence) -> int:
    return len(s.prompt_ids) + len(s.completion_ids) - 1


def _common_prefix(seqs: list[Sequence]) -> int:
    """Longest common prefix of the prompts (rows predicting completions stay out of the prefix)."""
    first = seqs[0].prompt_ids
    n = min(len(s.prompt_ids) for s in seqs)
    for s in seqs[1:]:
        other = s.prompt_ids
        n = next((i for i in range(n) if first[i] != other[i]), n)
    return n


def make_units(seqs: list[Sequence], budget: int, share_prefixes: bool) -> list[_Unit]:
    """Sequences of one ``prefix_group`` with a common prompt prefix become shared-prefix units (split
    so that each fits ``budget`` when it can); every other sequence is a unit of its own."""
    groups: dict[object, list[Sequence]] = {}
    for i, s in enumerate(seqs):
        key = s.prefix_group if share_prefixes and s.prefix_group is not None else ("own", i)
        groups.setdefault(key, []).append(s)
    units = []
    for members in groups.values():
        if len(members) == 1 or (p := _common_prefix(members)) == 0:
            units += [_Unit([m], _input_len(m)) for m in members]
            continue
        current = _Unit([], p)
        for m in members:
            if current.seqs and _Unit([*current.seqs, m], p).num_tokens > budget:
                units.append(current)
                current = _Unit([], p)
            current.seqs.append(m)
        units.append(current)
    return units


def _micro_batch(units: list[_Unit], agg: str, device: torch.device, replay: bool = False) -> _MicroBatch:
    ids, rows, targets, lps, advs, weights, segments = [], [], [], [], [], [], []
    offset = 0
    # replay: the record row of each packed row (-1: computed); one record per micro-batch, the first
    # sequence's (a rollout records all its sequences in one)
    record = next((s.record for u in units for s in u.seqs if s.record is not None), None) if replay else None
    recorded: list[int] = []
    keys: dict[int, list] = {}  # id(sequence) -> its prompt's prefix keys

    def prompt_rows(seq: Sequence, start: int, end: int) -> list[int]:
        """The filled record rows of prompt positions [start, end) of ``seq`` (-1 where none)."""
        if record is None or seq.record is not record or end <= start:
            return [-1] * max(0, end - start)
        if id(seq) not in keys:
            keys[id(seq)] = prefix_keys(seq.prompt_ids, len(seq.prompt_ids))
        return record.filled_prompt_rows(keys[id(seq)][start:end])

    for unit in units:
        p = unit.prefix_len
        first = unit.seqs[0]
        ids += (first.prompt_ids + first.completion_ids[:-1])[:p]
        recorded += prompt_rows(first, 0, p)
        prefix_start, offset = offset, offset + p
        children: list = []
        for group in unit.prompt_groups():
            # the rest of the prompt [p, shared_end) once for the group, then each one's branch
            shared_end = len(group[0].prompt_ids) if len(group) > 1 else p
            ids += group[0].prompt_ids[p:shared_end]
            recorded += prompt_rows(group[0], p, shared_end)
            shared_start, offset = offset, offset + shared_end - p
            branch_lens = []
            for s in group:
                x = s.prompt_ids + s.completion_ids[:-1]
                ids += x[shared_end:]
                if record is not None:  # the branch's rows: the prompt's rest, then the decode inputs
                    recorded += prompt_rows(s, shared_end, len(s.prompt_ids))
                    count = len(s.completion_ids) - 1
                    recorded += record.rows(s.record_key, count) if s.record is record else [-1] * count
                # token k of x sits in the prefix, in the group's shared part or in this branch
                rows += [
                    prefix_start + k
                    if k < p
                    else shared_start + k - p
                    if k < shared_end
                    else offset + k - shared_end
                    for k in range(len(s.prompt_ids) - 1, len(x))
                ]
                branch_lens.append(len(x) - shared_end)
                offset += len(x) - shared_end
                c = len(s.completion_ids)
                targets += s.completion_ids
                lps += s.sampler_logprobs
                advs += [s.advantage] * c
                weights += [1.0 / c if agg == "seq_mean_token_mean" else 1.0] * c
            children += [(shared_end - p, branch_lens)] if shared_end > p else branch_lens
        segments.append((p, children))

    def t(values, dtype):
        return torch.tensor(values, dtype=dtype, device=device)

    batch = AttentionBatch.shared_prefix(segments, device)  # plain packed sequences when nothing branches
    if record is not None and len(recorded) != len(ids):
        raise AssertionError(f"replay rows: {len(recorded)} for {len(ids)} packed tokens")
    return _MicroBatch(
        t(ids, torch.long), batch, t(rows, torch.long), t(targets, torch.long), t(lps, torch.float32),
        t(advs, torch.float32), t(weights, torch.float32),
        Replay.from_rows(record, recorded) if record is not None else None,
    )  # fmt: skip


def _completion_hidden(model: CausalLM, mb: _MicroBatch, replay: bool = False) -> torch.Tensor:  # [M, H]
    """Final hidden states of the rows that predict completion tokens (``replay``: with the sampler's
    recorded products where the micro-batch has them)."""
    return model.forward_hidden(mb.input_ids, mb.batch, replay=mb.replay if replay else None).index_select(
        0, mb.rows
    )


def _denominator(sequences: list[Sequence], config: TrainConfig, ctx: DistContext = SINGLE) -> int:
    """The aggregation constant over the sequences of all ranks."""
    num_seqs, num_tokens = all_reduce_sum(
        [len(sequences), sum(len(s.completion_ids) for s in sequences)], ctx
    )
    agg = config.loss.agg
    if agg == "drgrpo":
        return int(num_seqs) * config.loss_max_new_tokens
    if agg == "token_mean":
        return max(1, int(num_tokens))
    return max(1, int(num_seqs))


def accumulate_gradients(
    model: CausalLM, sequences: list[Sequence], config: TrainConfig, denominator: int | None = None
) -> dict[str, Any]:
    """Backward of the step's loss into the parameters' ``.grad`` (added); returns metrics.

    ``denominator``: the aggregation constant D (default: from ``sequences``; the distributed trainer
    passes the global one). ``metrics["finite"]`` is False when a micro-batch loss was not finite (the
    pass stops there).
    """
    loss_cfg = config.loss
    if denominator is None:
        denominator = _denominator(sequences, config)
    trained = [
        s for s in sequences if s.completion_ids and (s.advantage != 0 or not loss_cfg.skip_zero_advantage)
    ]
    metrics: dict[str, Any] = {
        "update/num_sequences": len(trained), "update/num_zero_advantage": len(sequences) - len(trained),
        "update/num_tokens": sum(len(s.completion_ids) for s in trained), "update/num_micro_batches": 0,
        "update/num_forward_tokens": 0,
        "time/logprob": 0.0, "finite": True,
    }  # fmt: skip
    if not trained:
        return metrics
    weight = model.lm_head_weight
    units = make_units(trained, loss_cfg.micro_batch_tokens, loss_cfg.share_prefixes)
    # the sampler's products are reused only by the one pass with gradients, and only when the
    # rollout recorded them (rollout.new_record decides: float32 CPU, sampler logprobs, ...)
    replay = (
        loss_cfg.replay_activations
        and loss_cfg.old_logprobs == "sampler"
        and not model.gradient_checkpointing
    )
    batches = [
        _micro_batch([units[i] for i in b], loss_cfg.agg, model.device, replay)
        for b in pack([u.num_tokens for u in units], loss_cfg.micro_batch_tokens)
    ]
    metrics["update/num_micro_batches"] = len(batches)
    metrics["update/num_forward_tokens"] = sum(mb.input_ids.numel() for mb in batches)
    metrics["update/num_replayed_tokens"] = sum(
        0 if mb.replay is None else mb.replay.taken.numel() for mb in batches
    )
    temperature = config.rollout.temperature

    old = [mb.sampler_logprobs for mb in batches]
    is_weights = [mb.weights for mb in batches]
    if loss_cfg.old_logprobs == "recompute":
        t0 = time.perf_counter()
        with torch.no_grad():
            old = [
                fused_linear_logprob(
                    _completion_hidden(model, mb), weight, mb.targets, temperature=temperature
                )
                for mb in batches
            ]
        if loss_cfg.tis_cap is not None:
            is_weights = [
                mb.weights * torch.exp(o - mb.sampler_logprobs).clamp(max=loss_cfg.tis_cap)
                for o, mb in zip(old, batches, strict=True)
            ]
        metrics["time/logprob"] = time.perf_counter() - t0

    total_loss, num_tokens, gaps = 0.0, 0, []
    sums = {"clip_fraction": 0.0, "mean_ratio": 0.0, "approx_kl": 0.0}
    for mb, old_lp, isw in zip(batches, old, is_weights, strict=True):
        hidden = _completion_hidden(model, mb, replay=True)
        loss, m = fused_grpo_loss(
            hidden, weight, mb.targets, old_lp, mb.advantages, torch.ones_like(mb.advantages),
            temperature=temperature, clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high,
            agg="drgrpo", max_new_tokens=denominator, is_weights=isw,
        )  # fmt: skip
        if not torch.isfinite(loss):
            metrics["finite"] = False
            break
        loss.backward()
        count = mb.targets.numel()
        total_loss += float(loss.detach())
        for key in sums:
            sums[key] += float(m[key]) * count
        gaps.append((m["logprobs"].float() - mb.sampler_logprobs).abs())
        num_tokens += count
    gap = torch.cat(gaps) if gaps else torch.zeros(0)
    metrics.update({
        "loss": total_loss if metrics["finite"] else float("nan"),
        **{key: value / max(num_tokens, 1) for key, value in sums.items()},
        "logprob_gap/mean": float(gap.mean()) if gap.numel() else None,
        "logprob_gap/max": float(gap.max()) if gap.numel() else None,
    })  # fmt: skip
    return metrics


def policy_update(
    model: CausalLM,
    optimizer: MasterAdamW,
    sequences: list[Sequence],
    config: TrainConfig,
    lr: float,
    ctx: DistContext = SINGLE,
    sharding: LayerSharding | None = None,
) -> dict[str, Any]:
    """One optimizer step over ``sequences``; a non-finite loss or gradient leaves the weights as they are.

    Under torchrun (``ctx``) the sequences are this rank's; the loss constant and the gradients are
    global, and every rank takes the same decision to step or skip. ``sharding``: the FSDP2 layers
    (``optim.fsdp``); their gradients are reduce-scattered and the step runs on the shards.
    """
    t0 = time.perf_counter()
    optimizer.zero_grad()
    if sharding is not None:
        sharding.begin_backward()
    metrics = accumulate_gradients(model, sequences, config, _denominator(sequences, config, ctx))
    if sharding is not None:
        sharding.reduce_gradients(model)  # every rank, whatever it trained: a collective
    finite = all_true(metrics.pop("finite"), ctx)
    metrics.update(lr=lr, skipped=0, skip_reason=None, grad_norm=None)
    (num_trained,) = all_reduce_sum([metrics["update/num_sequences"]], ctx)
    if not num_trained:
        metrics.update(skipped=1, skip_reason="no_signal")
    else:
        # FSDP2 layers' gradients are already reduce-scattered; the rest is summed here
        all_reduce_grads([p for p in optimizer.params if not isinstance(p, DTensor)], ctx)
        grad_norm = _grad_norm(optimizer.params, ctx)
        metrics["grad_norm"] = grad_norm
        if not finite or not math.isfinite(grad_norm):
            metrics.update(skipped=1, skip_reason="nonfinite_loss" if not finite else "nonfinite_grad")
        else:
            if config.optim.max_grad_norm > 0:
                _clip_grads(optimizer.params, config.optim.max_grad_norm, grad_norm)
            optimizer.set_lr(lr)
            optimizer.step()
    optimizer.zero_grad()
    metrics["time/update"] = time.perf_counter() - t0 - metrics["time/logprob"]
    return metrics


def _grad_norm(params: list[torch.nn.Parameter], ctx: DistContext = SINGLE) -> float:
    """The global L2 norm of the gradients (torch's clip_grad_norm_ formula, in fp32); the squares of
    FSDP2 shards are summed over the ranks."""
    whole = [
        p.grad.detach().float() for p in params if p.grad is not None and not isinstance(p.grad, DTensor)
    ]
    norm = (
        float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in whole])))
        if whole
        else 0.0
    )
    shards = [p.grad.to_local().float() for p in params if isinstance(p.grad, DTensor)]
    if shards:  # FSDP2: every rank holds shards, so every rank joins the sum
        (squares,) = all_reduce_sum([sum(float(g.square().sum()) for g in shards)], ctx)
        norm = math.sqrt(norm**2 + squares)
    return norm


def _clip_grads(params: list[torch.nn.Parameter], max_norm: float, total_norm: float) -> None:
    """Scale the gradients as torch's clip_grad_norm_ does (coefficient in fp32, at most 1), from the
    norm already computed instead of computing it again."""
    coef = float(torch.clamp(torch.tensor(max_norm) / (torch.tensor(total_norm) + 1e-6), max=1.0))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
