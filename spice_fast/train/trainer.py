"""The SPICE trainer: rollout and learning fused in one process over one set of weights.

``Trainer(config).train()`` loops ``config.steps`` iterations of ../shared/SPICE.md: the next B corpus
segments, ``spice_rollout`` with the engine (which reads the model's parameters in place), then
``policy_update`` (packed fused GRPO loss, AdamW updating the same tensors in place). It writes
``RUN_DIR/config.yaml``, ``metrics.jsonl``, ``samples.jsonl``, TensorBoard scalars and checkpoints
(``checkpoint.py``). ``Trainer(config, resume=True)`` continues from the newest complete checkpoint
exactly: the model, optimizer and master weights, RNG states and corpus position are restored and all
sampling randomness is keyed on (seed, step), so on a CPU a resumed run logs the same metrics as an
uninterrupted one. Ctrl-C writes a checkpoint of the last finished step before stopping.
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import spice_fast
from spice_fast.engine import Engine
from spice_fast.spice.corpus import Corpus
from spice_fast.train import checkpoint as ckpt
from spice_fast.train.config import TrainConfig, from_dict, load_yaml, to_dict
from spice_fast.train.distributed import (
    DistContext,
    LayerSharding,
    barrier,
    full_tensor,
    gather_metrics,
    init_distributed,
    merge_metrics,
)
from spice_fast.train.metrics import RunLogger, console_line
from spice_fast.train.rollout import spice_rollout
from spice_fast.train.update import learning_rate, make_optimizer, policy_update

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def read_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The resolved config a run saved in its directory (for ``--resume``)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"resume: {str(path)!r} not found; is {str(run_dir)!r} a spice-fast run directory?")
    data = load_yaml(path)  # a mapping, or a ValueError naming the file
    if not data:
        raise ValueError(f"resume: {str(path)!r} is not a config mapping")
    return data


class Trainer:
    def __init__(self, config: TrainConfig, *, resume: bool = False, ctx: DistContext | None = None):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
        self.ctx = ctx if ctx is not None else init_distributed()
        if config.spice.num_docs < self.ctx.world_size:
            raise ValueError(
                f"spice.num_docs: {config.spice.num_docs} documents cannot be shared by "
                f"{self.ctx.world_size} ranks; use at least one per rank"
            )
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.start_step = 0
        state = None
        if resume:
            if self.ctx.is_main:
                removed = ckpt.remove_partials(self.run_dir)
                if removed:
                    logger.warning(
                        "removed unfinished checkpoint files of a crashed save: %s", ", ".join(removed)
                    )
            barrier(self.ctx)
            last = ckpt.latest_checkpoint(self.run_dir)
            if last is None:
                raise ValueError(f"resume: {str(self.run_dir)!r} has no complete checkpoint")
            state = ckpt.load_state(last)
            model_source = str(last)
        else:
            if ckpt.list_checkpoints(self.run_dir):
                raise ValueError(
                    f"run_dir {str(self.run_dir)!r} already holds checkpoints; resume it with --resume "
                    "or choose another run_dir"
                )
            model_source = config.model.name
        m = config.model
        self.model, self.tokenizer = spice_fast.load(model_source, dtype=m.dtype, device=m.device)
        if self.tokenizer is None:
            raise ValueError(f"model {model_source!r} has no tokenizer; SPICE prompts are text")
        self.model.gradient_checkpointing = m.gradient_checkpointing
        self.model.train()
        count = lambda text: len(self.tokenizer.encode(text, add_special_tokens=False))
        self.corpus = Corpus(config.corpus, count_tokens=count)
        self.sharding = None
        if config.optim.fsdp and self.ctx.enabled:
            self.sharding = LayerSharding(self.model, self.ctx)
        elif config.optim.fsdp:
            logger.info("optim.fsdp: a single process has nothing to shard over; training unsharded")
        # the optimizer first: its fp32 masters exist now, its moments at the first step (reserved below)
        self.optimizer = make_optimizer(self.model, config, self.ctx)
        r = config.rollout
        self.engine = Engine(
            self.model, self.tokenizer, max_num_seqs=r.max_num_seqs, max_model_len=r.max_model_len,
            block_size=r.block_size, kv_cache_gb=r.kv_cache_gb or self._default_kv_cache_gb(),
        )  # fmt: skip
        if state is not None:
            self._restore(state)
        self.log = RunLogger(self.run_dir, tensorboard=config.tensorboard) if self.ctx.is_main else None
        if self.log is not None:
            self.log.truncate_after(self.start_step)
            self._write_config()

    def _default_kv_cache_gb(self) -> float | None:
        """On a GPU: half of the memory left once AdamW's two fp32 moments are reserved (the engine's
        own default, half of what is free now, would not leave them room). Elsewhere: the engine's."""
        if self.model.device.type != "cuda":
            return None
        if self.sharding is not None:
            self.sharding.gather()  # the rollout's full parameters are part of what is not free
        free = torch.cuda.mem_get_info(self.model.device)[0]
        num_params = sum(p.numel() for p in self.model.parameters())
        o = self.config.optim
        moments = 8 * num_params // (self.ctx.world_size if o.shard_state or o.fsdp else 1)
        left = free - moments
        if left <= 0:
            raise ValueError(
                f"rollout.kv_cache_gb: {free / 2**30:.1f} GiB are free, AdamW's moments need "
                f"{moments / 2**30:.1f} GiB; no room for the KV cache (try optim.shard_state=true)"
            )
        return 0.5 * left / 2**30

    # ---- state ----

    def state_dict(self, step: int) -> dict[str, Any]:
        return {
            "version": 1,
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "corpus": self.corpus.state_dict(),
            "rng": {
                "python": random.getstate(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "config": to_dict(self.config),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.corpus.load_state_dict(state["corpus"])
        rng = state["rng"]
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.start_step = state["step"]

    def _write_config(self) -> None:
        import yaml

        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / CONFIG_FILE
        tmp = path.with_name(CONFIG_FILE + ".tmp")
        tmp.write_text(yaml.safe_dump(to_dict(self.config), sort_keys=False), encoding="utf-8")
        tmp.replace(path)

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters (FSDP2 shards gathered: every rank calls it)."""
        return {name: full_tensor(t) for name, t in self.model.state_dict().items()}

    def save(self, step: int, final: bool = True) -> Path | None:
        """Rank 0 writes; the others wait until the checkpoint is complete. A write that fails
        (``CheckpointWriteError``: disk full, permissions) is raised when ``final``; otherwise it is logged
        and training goes on (the next checkpoint tries again) and None is returned."""
        path = ckpt.checkpoint_root(self.run_dir) / f"step-{step:06d}"
        state = self.state_dict(step)  # every rank: a sharded optimizer gathers its state to rank 0
        weights = self.model_state_dict() if self.sharding is not None else None
        error = None
        if self.ctx.is_main:
            keep = self.config.keep_checkpoints
            try:
                path = ckpt.save_checkpoint(
                    self.run_dir, step, self.model, self.tokenizer, state, keep=keep, model_state=weights
                )
            except ckpt.CheckpointWriteError as e:
                error = e
        barrier(self.ctx)  # every rank gets here, also when rank 0's write failed
        if error is not None:
            if final:
                raise error
            logger.error("step %d: %s; training goes on, the next checkpoint tries again", step, error)
            return None
        return path

    # ---- loop ----

    def step(self, step: int) -> dict[str, Any]:
        """One SPICE iteration; returns its metrics (already logged)."""
        c = self.config
        t0 = time.perf_counter()
        documents = self.corpus.next_batch(c.spice.num_docs)  # the global batch, the same on every rank
        mine = list(range(self.ctx.rank, len(documents), self.ctx.world_size))
        show = c.progress and self.ctx.is_main
        if self.sharding is not None:
            self.sharding.gather()  # full parameters for the sampler, kept for the update
        rollout = spice_rollout(
            self.engine, self.tokenizer, [documents[i] for i in mine], c, step, mine, show
        )
        update = policy_update(
            self.model, self.optimizer, rollout.sequences, c, learning_rate(c, step), self.ctx, self.sharding
        )
        metrics = {**rollout.metrics, **update}
        metrics.update({
            "corpus/epoch": self.corpus.epoch, "corpus/position": self.corpus.position,
            "time/step": time.perf_counter() - t0,
        })  # fmt: skip
        metrics = merge_metrics(gather_metrics(metrics, self.ctx), c.spice.num_reasoner_samples)
        if self.log is not None:
            self.log.log(step, metrics)
            if c.sample_every and step % c.sample_every == 0:
                self.log.log_samples(step, rollout.samples)
        if update["skipped"] and update["skip_reason"] != "no_signal":
            logger.warning(
                "step %d: update skipped (%s); the weights are unchanged", step, update["skip_reason"]
            )
        return metrics

    def train(self) -> list[dict[str, Any]]:
        c = self.config
        history = []
        saved = self.start_step
        bar = tqdm(
            total=c.steps, initial=self.start_step, desc="spice", unit="step",
            disable=not (c.progress and self.ctx.is_main),
            dynamic_ncols=True,
        )  # fmt: skip
        done = self.start_step  # last step whose update is applied
        try:
            for step in range(self.start_step + 1, c.steps + 1):
                metrics = self.step(step)
                done = step
                history.append(metrics)
                bar.update(1)
                if c.progress and self.ctx.is_main:
                    bar.write(console_line(step, c.steps, metrics))
                if (c.checkpoint_every and step % c.checkpoint_every == 0) or step == c.steps:
                    if self.save(step, final=step == c.steps) is not None:
                        saved = step
        except KeyboardInterrupt:
            if done > saved and not self.ctx.enabled:  # other ranks may be gone: no collective save
                logger.warning("interrupted: writing a checkpoint of step %d", done)
                self.save(done)
            raise
        finally:
            bar.close()
            if self.log is not None:
                self.log.close()
        return history


def resume_config(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """The saved config of ``run_dir`` with ``key=value`` overrides (e.g. more ``steps``)."""
    from spice_fast.train.config import _merge, parse_override

    values = read_run_config(run_dir)
    values["run_dir"] = str(run_dir)
    for text in overrides:
        values = _merge(values, parse_override(text))
    return from_dict(values)
