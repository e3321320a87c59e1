"""Typed configuration of ``spice-fast train``: dataclass sections, presets, YAML files, key=value overrides.

``TrainConfig`` holds one dataclass per concern (model, corpus, spice, rollout, optim, loss). A run's
config is ``preset -> YAML file -> key=value overrides`` (later wins), e.g.
``spice-fast train --config my.yaml spice.num_docs=8 optim.lr=2e-6 steps=20``. Every value is checked
against its field's type and every section's ``__post_init__`` checks ranges, so a bad value fails
before any model is loaded, with a message naming the key and the value.

Presets: ``cpu-tiny`` (the default: embedded model and corpus, a few small steps on a 2-core CPU) and
``paper`` (the Qwen3-4B-Base settings of ../shared/SPICE.md). Tested by tests/test_train_config.py.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spice_fast.spice.corpus import CorpusConfig
from spice_fast.spice.prompts import ANSWER_TYPES

AGGREGATIONS = ("drgrpo", "token_mean", "seq_mean_token_mean")


def _check(cond: bool, key: str, value: Any, want: str) -> None:
    if not cond:
        raise ValueError(f"{key}: expected {want}, got {value!r}")


@dataclass
class ModelSection:
    name: str = "smollm2-135m"  # directory, .gguf file, hub id or alias passed to spice_fast.load
    dtype: str | None = None  # parameters the sampler reads: float32 on a CPU, bfloat16 on a GPU
    device: str | None = None  # cpu | cuda (default: cuda when available)
    gradient_checkpointing: bool = False  # recompute each layer in backward to save activation memory

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", self.name, "a non-empty string")
        dtypes = (None, "float32", "bfloat16", "float16")
        _check(self.dtype in dtypes, "model.dtype", self.dtype, f"one of {dtypes}")


@dataclass
class SpiceSection:
    num_docs: int = 2  # B: documents per step
    num_challenger_samples: int = 4  # G: challenger samples per document (one challenger group)
    num_reasoner_samples: int = 4  # K: reasoner answers per valid question (one reasoner group)
    answer_type_mix: dict[str, float] = field(
        default_factory=lambda: {"mcq": 0.4, "integer": 0.2, "expression": 0.2, "string": 0.2}
    )  # weights of the answer types the challenger is asked for, drawn per sample
    invalid_reward: float = -0.1  # rho: challenger reward of an invalid task
    reasoner_questions: str = "one"  # "one" valid question per document is trained on, or "all"
    max_question_chars: int = 2000  # longer questions are invalid ("too_long")
    prefill_question_tag: bool = True  # start the challenger's reply with "<question>" (format kept)

    def __post_init__(self) -> None:
        for name in ("num_docs", "num_challenger_samples", "num_reasoner_samples", "max_question_chars"):
            value = getattr(self, name)
            _check(value >= 1, f"spice.{name}", value, "an int >= 1")
        bad = sorted(set(self.answer_type_mix) - set(ANSWER_TYPES))
        weights = list(self.answer_type_mix.values())
        _check(
            not bad and bool(weights) and min(weights) >= 0 and sum(weights) > 0,
            "spice.answer_type_mix", self.answer_type_mix, f"non-negative weights over {ANSWER_TYPES}",
        )  # fmt: skip
        _check(self.invalid_reward < 0.05, "spice.invalid_reward", self.invalid_reward, "a value < 0.05")
        _check(
            self.reasoner_questions in ("one", "all"), "spice.reasoner_questions",
            self.reasoner_questions, "'one' or 'all'",
        )  # fmt: skip


@dataclass
class RolloutSection:
    temperature: float = 1.0  # sampling temperature of both roles (the loss uses the same one)
    top_p: float = 1.0  # nucleus mass; logprobs stay over the full vocabulary either way
    challenger_max_tokens: int = 128  # new tokens of a challenger answer
    reasoner_max_tokens: int = 128  # new tokens of a reasoner answer
    max_model_len: int = 2048  # prompt + completion limit of the engine
    max_num_seqs: int = 64  # sequences decoded together
    block_size: int = 16  # KV block size in tokens
    kv_cache_gb: float | None = None  # KV pool size (default: enough for max_num_seqs full sequences)

    def __post_init__(self) -> None:
        _check(self.temperature > 0, "rollout.temperature", self.temperature, "> 0 (sampling, not greedy)")
        _check(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "a value in (0, 1]")
        for name in ("challenger_max_tokens", "reasoner_max_tokens", "max_num_seqs", "block_size"):
            _check(getattr(self, name) >= 1, f"rollout.{name}", getattr(self, name), "an int >= 1")
        longest = max(self.challenger_max_tokens, self.reasoner_max_tokens)
        _check(
            self.max_model_len > longest, "rollout.max_model_len", self.max_model_len,
            f"more than the longest completion ({longest} tokens)",
        )  # fmt: skip
        _check(
            self.kv_cache_gb is None or self.kv_cache_gb > 0, "rollout.kv_cache_gb", self.kv_cache_gb,
            "None or > 0",
        )  # fmt: skip


@dataclass
class OptimSection:
    lr: float = 1e-6  # constant learning rate after warmup (SPICE: 1e-6)
    warmup_steps: int = 0  # linear warmup from lr / warmup_steps
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.999  # AdamW second-moment decay
    eps: float = 1e-8  # AdamW denominator epsilon
    weight_decay: float = 0.0  # decoupled weight decay
    max_grad_norm: float = 1.0  # clip the global gradient norm to this (0 = no clipping)
    shard_state: bool = False  # under torchrun: partition AdamW's moments over the ranks (ZeRO-1)
    # under torchrun: FSDP2 fully_shard of the decoder layers; parameters are gathered for the rollout
    # and the update, their gradients, fp32 masters and AdamW moments stay sharded
    fsdp: bool = False

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", self.lr, "> 0")
        _check(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, ">= 0")
        for name in ("beta1", "beta2"):
            _check(0 <= getattr(self, name) < 1, f"optim.{name}", getattr(self, name), "a value in [0, 1)")
        _check(self.eps > 0, "optim.eps", self.eps, "> 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, ">= 0")
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", self.max_grad_norm, ">= 0")
        if self.fsdp and self.shard_state:
            raise ValueError(
                "optim.fsdp and optim.shard_state: choose one (FSDP2 already shards AdamW's state)"
            )


@dataclass
class LossSection:
    clip_low: float = 0.2  # eps_low of the clipped ratio
    clip_high: float = 0.2  # eps_high of the clipped ratio
    agg: str = "drgrpo"  # drgrpo | token_mean (DAPO) | seq_mean_token_mean (GRPO)
    max_new_tokens: int | None = None  # Dr. GRPO constant; default: the larger of the two roles' limits
    old_logprobs: str = "sampler"  # "sampler" (free) or "recompute" (an extra no-grad trainer pass)
    tis_cap: float | None = None  # truncated importance sampling cap (needs old_logprobs=recompute)
    micro_batch_tokens: int = 4096  # packed tokens per forward/backward pass
    skip_zero_advantage: bool = True  # sequences with advantage 0 add no gradient: do not run them
    share_prefixes: bool = True  # run a document (and each whole prompt) its samples share once per batch
    # the update's forward takes completion rows' layer products from the sampler's decode steps
    # (spice_fast.model.replay): float32 CPU runs with old_logprobs=sampler, no gradient checkpointing
    # and no FSDP; replay_max_gb bounds the record (rows beyond it are computed)
    replay_activations: bool = True
    replay_max_gb: float = 4.0

    def __post_init__(self) -> None:
        _check(0 <= self.clip_low < 1, "loss.clip_low", self.clip_low, "a value in [0, 1)")
        _check(self.clip_high >= 0, "loss.clip_high", self.clip_high, ">= 0")
        _check(self.agg in AGGREGATIONS, "loss.agg", self.agg, f"one of {AGGREGATIONS}")
        _check(
            self.max_new_tokens is None or self.max_new_tokens >= 1, "loss.max_new_tokens",
            self.max_new_tokens, "None or an int >= 1",
        )  # fmt: skip
        modes = ("sampler", "recompute")
        _check(self.old_logprobs in modes, "loss.old_logprobs", self.old_logprobs, f"one of {modes}")
        if self.tis_cap is not None:
            _check(self.tis_cap > 0, "loss.tis_cap", self.tis_cap, "None or > 0")
            _check(
                self.old_logprobs == "recompute", "loss.tis_cap", self.tis_cap,
                "None unless loss.old_logprobs=recompute (the weights compare trainer and sampler logprobs)",
            )  # fmt: skip
        _check(self.micro_batch_tokens >= 16, "loss.micro_batch_tokens", self.micro_batch_tokens, ">= 16")
        _check(self.replay_max_gb >= 0, "loss.replay_max_gb", self.replay_max_gb, ">= 0")


@dataclass
class TrainConfig:
    run_dir: str = "runs/spice"  # metrics, samples, checkpoints and the resolved config go here
    steps: int = 5  # SPICE iterations (one policy update each)
    seed: int = 0  # seeds sampling, answer types and question choice (the corpus has its own)
    checkpoint_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep_checkpoints: int = 2  # most recent checkpoints kept on disk
    sample_every: int = 1  # log example questions and answers every N steps (0: never)
    tensorboard: bool = True  # also write TensorBoard scalars when tensorboard is installed
    progress: bool = True  # live progress display on the console
    model: ModelSection = field(default_factory=ModelSection)
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(max_doc_tokens=200))
    spice: SpiceSection = field(default_factory=SpiceSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    optim: OptimSection = field(default_factory=OptimSection)
    loss: LossSection = field(default_factory=LossSection)

    def __post_init__(self) -> None:
        _check(bool(self.run_dir), "run_dir", self.run_dir, "a non-empty path")
        for name in ("steps", "keep_checkpoints"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "an int >= 1")
        for name in ("checkpoint_every", "sample_every"):
            _check(getattr(self, name) >= 0, name, getattr(self, name), "an int >= 0")

    @property
    def loss_max_new_tokens(self) -> int:
        """The Dr. GRPO constant: ``loss.max_new_tokens`` or the longer of the two roles' limits."""
        return self.loss.max_new_tokens or max(
            self.rollout.challenger_max_tokens, self.rollout.reasoner_max_tokens
        )


# ---- presets ----


def _cpu_tiny() -> dict[str, Any]:
    # the dataclass defaults, with a cooler sampler: a 135M model at T=1 writes almost no valid task
    return {"rollout": {"temperature": 0.7, "top_p": 0.95}}


def _paper() -> dict[str, Any]:
    return {
        "steps": 640,
        "checkpoint_every": 20,
        "sample_every": 5,
        "model": {"name": "Qwen/Qwen3-4B-Base", "gradient_checkpointing": True},
        "corpus": {"max_doc_tokens": 6000},
        "spice": {"num_docs": 128, "num_challenger_samples": 8, "num_reasoner_samples": 8},
        "rollout": {
            "temperature": 1.0, "top_p": 1.0, "challenger_max_tokens": 1024, "reasoner_max_tokens": 4096,
            "max_model_len": 12288, "max_num_seqs": 512,
        },
        "optim": {"lr": 1e-6},
        "loss": {"micro_batch_tokens": 32768},
    }  # fmt: skip


PRESETS = {"cpu-tiny": _cpu_tiny, "paper": _paper}


# ---- building a config from presets, YAML and overrides ----


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """``value`` as type ``hint`` (int, float, bool, str, dict[str, float], X | None, a section)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        return _coerce(value, inner[0], key)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping of {hint.__name__} fields, got {value!r}")
        return _build(hint, value, key + ".")
    if origin is dict:
        _, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an int, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-6" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{key}: unsupported config type {hint}")  # our own dataclasses only


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = _field_types(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown config key (known: {', '.join(sorted(hints))})")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in values.items()}
    return cls(**kwargs)


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "answer_type_mix":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """``"spice.num_docs=8"`` -> ``{"spice": {"num_docs": 8}}``; the value is read as YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r}: expected key=value, e.g. spice.num_docs=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({e})") from None
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"config file {str(path)!r}: expected a mapping at the top, got {type(data).__name__}"
        )
    return data


def make_config(
    preset: str = "cpu-tiny", *, file: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """preset -> YAML file -> key=value overrides, validated into a TrainConfig."""
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    values = PRESETS[preset]()
    if file is not None:
        values = _merge(values, load_yaml(file))
    for text in overrides:
        values = _merge(values, parse_override(text))
    return _build(TrainConfig, values)


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(values: dict[str, Any]) -> TrainConfig:
    return _build(TrainConfig, values)
