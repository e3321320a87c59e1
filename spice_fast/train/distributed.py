"""Several processes, one run: torchrun launches them, torch.distributed reduces the gradients.

``spice-fast train`` under ``torchrun --nproc_per_node N`` (one node or many; the rendezvous is
torchrun's) joins the process group (NCCL on GPUs, gloo on CPUs). Every rank holds the whole model
(its sampler reads it) and the same optimizer state, like DDP: each step the B documents of the
global batch are dealt round-robin to the ranks, so a challenger group and its reasoner groups live
on one rank and rewards and advantages need no communication. The loss of every rank is divided by
the global constant (all-reduced counts), the gradients are all-reduced (summed) in buckets, so every
rank applies the gradient of the global loss and the parameters stay identical. Metrics are gathered
and merged before rank 0 logs them; rank 0 writes checkpoints, every rank reads them on resume (the
corpus position is global, so the number of ranks may change between runs).

Two ways to shard what does not fit one GPU: ``optim.shard_state=true`` partitions AdamW's moments
(``ZeroRedundancyOptimizer``, ZeRO-1, parameters and gradients whole); ``optim.fsdp=true`` applies FSDP2
``fully_shard`` to every decoder layer (``LayerSharding``): the layers' parameters, gradients, fp32
master weights and AdamW moments live sharded between steps. Each step gathers the full parameters
once for the rollout (the sampler reads them) and keeps them for the update, whose micro-batches
accumulate gradients without communication (ranks run different numbers of them); one small pass on
every rank then reduce-scatters the gradients, the layers go back to their shards and the optimizer
steps on the shards. The embedding, final norm and LM head stay replicated and are all-reduced.
Tested by tests/test_distributed.py (2 CPU processes with gloo: parameters identical across ranks and
equal to a single-process run over the same batch, with and without sharding; resuming with another
number of ranks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor

_BUCKET_BYTES = 64 * 1024**2


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = DistContext()


def init_distributed() -> DistContext:
    """Join torchrun's process group when launched by torchrun (``WORLD_SIZE`` > 1), else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def _device() -> torch.device:
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def all_reduce_sum(values: list[float], ctx: DistContext) -> list[float]:
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_true(flag: bool, ctx: DistContext) -> bool:
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


@torch.no_grad()
def all_reduce_grads(params: list[torch.nn.Parameter], ctx: DistContext) -> None:
    """Sum every parameter's gradient over the ranks (a missing gradient counts as zeros)."""
    if not ctx.enabled:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    bucket: list[torch.Tensor] = []
    size = 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= _BUCKET_BYTES:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def gather_metrics(metrics: dict[str, Any], ctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's metrics (on every rank)."""
    if not ctx.enabled:
        return [metrics]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, metrics)
    return out


# ---- merging per-rank metrics into the step's metrics ----

# key -> the count key that weights its per-rank means
_WEIGHTED = {
    "challenger/valid_rate": "challenger/num_samples",
    "challenger/reward_mean": "challenger/num_samples",
    "length/challenger_mean": "challenger/num_samples",
    "length/challenger_truncated": "challenger/num_samples",
    "reasoner/accuracy": "_reasoner_samples",
    "length/reasoner_mean": "_reasoner_samples",
    "length/reasoner_truncated": "_reasoner_samples",
    "reasoner/pass_rate_mean": "reasoner/num_questions",
    "clip_fraction": "update/num_tokens",
    "mean_ratio": "update/num_tokens",
    "approx_kl": "update/num_tokens",
    "logprob_gap/mean": "update/num_tokens",
}
_SUMMED_PREFIXES = (
    "challenger/num_",
    "challenger/invalid/",
    "reasoner/num_",
    "update/num_",
    "throughput/gen_tokens",
)
_MAXED = ("logprob_gap/max", "time/", "skipped")


def merge_metrics(per_rank: list[dict[str, Any]], num_reasoner_samples: int) -> dict[str, Any]:
    """One step's metrics from the ranks' metrics: counts summed, means weighted by their counts,
    times and maxima maxed; the loss is summed (each rank's part is divided by the global constant);
    the rest (lr, grad norm after the all-reduce, corpus position) are equal on all ranks."""
    if len(per_rank) == 1:
        return dict(per_rank[0])
    for m in per_rank:
        m["_reasoner_samples"] = (m.get("reasoner/num_questions") or 0) * num_reasoner_samples
    merged: dict[str, Any] = {}
    for key in per_rank[0]:
        values = [m.get(key) for m in per_rank]
        if key in _WEIGHTED:
            pairs = [
                (v, m[_WEIGHTED[key]] or 0) for v, m in zip(values, per_rank, strict=True) if v is not None
            ]
            total = sum(w for _, w in pairs)
            merged[key] = sum(v * w for v, w in pairs) / total if total else None
        elif key == "reasoner/pass_rate_hist":
            merged[key] = [sum(col) for col in zip(*values, strict=True)]
        elif key == "throughput/gen_tokens_per_s":
            continue  # from the summed tokens and the slowest rank's rollout time, below
        elif key.startswith(_SUMMED_PREFIXES) or key in ("corpus/skipped_too_long", "loss"):
            merged[key] = sum(v or 0 for v in values)
        elif key.startswith(_MAXED):
            present = [v for v in values if v is not None]
            merged[key] = max(present) if present else None
        else:
            merged[key] = values[0]
    merged.pop("_reasoner_samples", None)
    if "throughput/gen_tokens" in merged and merged.get("time/rollout"):
        merged["throughput/gen_tokens_per_s"] = merged["throughput/gen_tokens"] / merged["time/rollout"]
    return merged


# ---- FSDP2 over the decoder layers ----


class LayerSharding:
    """FSDP2 ``fully_shard`` over a ``CausalLM``'s decoder layers, driven by the trainer's step.

    ``gather()`` before the rollout (the engine and the update read full parameters; the layers never
    reshard in between, so no rank waits on another while their rollouts differ), ``begin_backward()``
    before the micro-batches (gradients accumulate locally), ``reduce_gradients(model)`` after them on
    every rank (one 1-token pass whose backward reduce-scatters each layer's accumulated gradient; the
    layers go back to their shards, and the gradients become sums over the ranks).
    """

    def __init__(self, model, ctx: DistContext):
        from torch.distributed.fsdp import fully_shard

        self.world_size = ctx.world_size
        self.layers = list(model.model.layers)
        for layer in self.layers:
            fully_shard(layer, reshard_after_forward=False)
        self.params = [p for layer in self.layers for p in layer.parameters()]  # the sharded ones
        self.gathered = False

    def gather(self) -> None:
        if not self.gathered:
            for layer in self.layers:
                layer.unshard()
            self.gathered = True

    def begin_backward(self) -> None:
        self.gather()
        for layer in self.layers:
            layer.set_requires_gradient_sync(False)
            layer.set_reshard_after_backward(False)

    def reduce_gradients(self, model) -> None:
        from spice_fast.model.attention import AttentionBatch

        for layer in self.layers:
            layer.set_requires_gradient_sync(True)
        ids = torch.zeros(1, dtype=torch.long, device=model.device)
        with torch.enable_grad():
            hidden = model.forward_hidden(ids, AttentionBatch.packed([1], model.device))
            hidden.backward(torch.zeros_like(hidden))  # adds nothing; triggers the reduce-scatters
        self.release()
        with torch.no_grad():
            for p in self.params:  # FSDP averages over the ranks; the trainer's loss wants the sum
                if p.grad is not None:
                    p.grad.mul_(self.world_size)

    def release(self) -> None:
        for layer in self.layers:
            layer.reshard()
        self.gathered = False


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every rank calls it), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``like``: its shard when ``like`` is a DTensor (every rank calls it)."""
    if isinstance(like, DTensor):
        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full
