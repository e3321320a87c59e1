"""Checkpoints in and out: ``load(name_or_path)`` and ``save(model, tokenizer, out_dir)``.

``load`` accepts a local Hugging Face directory (``config.json`` plus one or sharded
``*.safetensors``), a hub id (through huggingface_hub's cache), a ``.gguf`` file (dequantized by
transformers' GGUF support) and the alias ``smollm2-135m``. ``save`` writes a directory that
``transformers.AutoModelForCausalLM.from_pretrained`` loads with the same logits, atomically: the
new checkpoint is written beside the old one and swapped in by renames, so a crash mid-save leaves
the previous checkpoint intact. tests/test_weights.py covers both directions and the error cases.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from spice_fast.model import CausalLM, ModelConfig
from spice_fast.weights.safetensors_io import (
    CheckpointError,
    fsync_tree,
    read_tensors,
    weight_files,
    write_shards,
)
from spice_fast.weights.sources import ALIASES, DEFAULT_MODEL, alias_path, hub_snapshot, looks_like_hub_id

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MODEL", "CheckpointError", "load", "save"]
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _default_dtype(device: torch.device) -> torch.dtype:
    # bf16 on GPUs (what the sampler reads, fp32 master weights live in the optimizer); fp32 on CPUs.
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device: not a torch device, got {device!r}") from e


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype: expected a floating torch dtype or its name, got {dtype!r}")
    return resolved


def _build(config: ModelConfig, tensors: dict[str, torch.Tensor], device: torch.device) -> CausalLM:
    with torch.device("meta"):
        model = CausalLM(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.to(device).eval()


def _expected_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {name: t.shape for name, t in CausalLM(config).state_dict().items()}


def load_directory(directory: Path, *, dtype: torch.dtype | None, device: torch.device):
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json, so not a Hugging Face model directory")
    try:
        config_dict = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({e})") from e
    config = ModelConfig.from_hf(config_dict)
    expected = _expected_shapes(config)
    # Tied checkpoints sometimes also store the head; it is the embedding, so skipping it is exact.
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    tensors = read_tensors(
        weight_files(directory), expected, dtype=dtype or _default_dtype(device), optional=optional
    )
    model = _build(config, tensors, device)
    tokenizer = None
    if any((directory / name).is_file() for name in _TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    return model, tokenizer


def gguf_cache_dir(path: Path) -> Path | None:
    """Where the dequantized copy of a GGUF file is kept; ``None`` when caching is off.

    Reading GGUF metadata is slow in pure Python (about 30 s for SmolLM2's 49k-token vocabulary),
    so the first load writes an exact float32 safetensors copy, keyed by the file's path, size and
    modification time; later loads read that. ``SPICE_FAST_CACHE`` sets the folder, ``off`` disables.
    """
    root = os.environ.get("SPICE_FAST_CACHE", "")
    if root.strip().lower() == "off":
        return None
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "spice_fast"
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return base / "gguf" / f"{path.stem}-{key}"


def load_gguf(path: Path, *, dtype: torch.dtype | None, device: torch.device):
    """Dequantize a GGUF file with transformers' GGUF support (once; see ``gguf_cache_dir``)."""
    cache = gguf_cache_dir(path)
    if cache is not None and (cache / "config.json").is_file():
        try:
            return load_directory(cache, dtype=dtype, device=device)
        except CheckpointError as e:
            logger.warning("cached copy of %s is unusable (%s); converting the GGUF file again", path, e)
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise CheckpointError("loading a .gguf file needs transformers, gguf and accelerate") from e
    logger.warning("reading %s with transformers' GGUF loader (slow the first time only)", path)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except (OSError, ValueError, KeyError, EOFError, IndexError) as e:
        raise CheckpointError(f"{path}: cannot read GGUF file ({type(e).__name__}: {e})") from e
    config = ModelConfig.from_hf(hf_model.config.to_dict())
    state = hf_model.state_dict()
    expected = _expected_shapes(config)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} in all)")
    model = _build(config, {name: state[name] for name in expected}, torch.device("cpu"))
    if cache is not None:
        try:
            save(model, tokenizer, cache)
        except OSError as e:
            logger.warning("could not cache the converted GGUF file at %s (%s)", cache, e)
    return model.to(device=device, dtype=dtype or _default_dtype(device)), tokenizer


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[CausalLM, Any]:
    """Load ``(model, tokenizer)``; the tokenizer is ``None`` when the checkpoint has none.

    ``dtype`` defaults to bfloat16 on a GPU and float32 on a CPU; ``device`` to CUDA when available.
    """
    dtype = _check_dtype(dtype)
    device = _resolve_device(device)
    name = os.fspath(name_or_path)
    if name in ALIASES:
        return load_gguf(alias_path(name), dtype=dtype, device=device)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_directory(path, dtype=dtype, device=device)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise CheckpointError(f"GGUF file {path} does not exist")
        return load_gguf(path, dtype=dtype, device=device)
    if path.exists():
        raise CheckpointError(f"{path} is neither a model directory nor a .gguf file")
    if looks_like_hub_id(name):
        return load_directory(hub_snapshot(name), dtype=dtype, device=device)
    raise CheckpointError(
        f"model {name!r} not found: expected a local directory, a .gguf file, a hub id 'org/name' "
        f"or one of the aliases {sorted(ALIASES)}"
    )


def save(
    model: CausalLM,
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 5 * 1024**3,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer`` unless ``None``) as a Hugging Face directory, atomically.

    ``state_dict``: the tensors to write instead of ``model.state_dict()`` (e.g. gathered shards)."""
    if not isinstance(model, CausalLM):
        raise TypeError(f"model: expected a spice_fast CausalLM, got {type(model).__name__}")
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.with_name(out.name + ".old")
    if not out.exists() and old.is_dir():
        # A previous save died between its two renames; put the last complete checkpoint back.
        old.rename(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        state = model.state_dict() if state_dict is None else state_dict
        write_shards(state, tmp, max_shard_bytes)
        dtype_name = str(model.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf(dtype=dtype_name), indent=2) + "\n")
        _write_generation_config(model.config, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _write_generation_config(config: ModelConfig, directory: Path) -> None:
    gen = {k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    gen = {k: v for k, v in gen.items() if v is not None}
    if gen:
        (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
