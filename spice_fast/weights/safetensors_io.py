"""Reading and writing Hugging Face safetensors checkpoints (single file or sharded with an index).

Reading never unpickles: only ``*.safetensors`` files are opened. Every failure names the file and,
where there is one, the tensor: a corrupt or truncated file, a missing tensor, a shape mismatch,
a non-finite weight. Writing shards the state dict like transformers (``model-00001-of-0000N``
plus ``model.safetensors.index.json``), with the ``{"format": "pt"}`` metadata transformers expects.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Tensors some checkpoints carry that the model recomputes instead of loading.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read: missing, corrupt, incomplete or not matching its config."""


def weight_files(directory: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
        files = {name: directory / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index} lists shard {shard.name}, which is missing from {directory}")
        return files
    paths = sorted(directory.glob("*.safetensors"))
    if not paths:
        pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.pt")
        )
        hint = (
            f"; found {pickles}, which spice_fast never unpickles: convert them to safetensors first"
            if pickles
            else ""
        )
        raise CheckpointError(f"{directory}: no *.safetensors weights{hint}")
    files: dict[str, Path] = {}
    for path in paths:
        for name in _open(path).keys():
            files[name] = path
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e


def read_tensors(
    files: dict[str, Path],
    expected: dict[str, torch.Size],
    *,
    dtype: torch.dtype,
    optional: set[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Read the ``expected`` tensors, cast to ``dtype``; check presence, shape and finiteness."""
    missing = sorted(name for name in expected if name not in files and name not in optional)
    if missing:
        searched = sorted({p.name for p in files.values()})
        raise CheckpointError(
            f"tensor {missing[0]!r} is missing from the checkpoint ({len(missing)} missing in all: "
            f"{missing[:5]}); searched {searched}"
        )
    unexpected = sorted(
        n for n in files if n not in expected and n not in optional and not n.endswith(_IGNORED_SUFFIXES)
    )
    if unexpected:
        logger.warning("ignoring %d tensors the model does not use: %s", len(unexpected), unexpected[:5])
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        handle = _open(path)
        for name in names:
            try:
                tensor = handle.get_tensor(name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot read tensor {name!r} ({e})") from e
            if tensor.shape != expected[name]:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {list(tensor.shape)}, the config needs "
                    f"{list(expected[name])}"
                )
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{path}: tensor {name!r} holds NaN or Inf values")
            out[name] = tensor.to(dtype)
    return out


def write_shards(state_dict: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int) -> list[Path]:
    """Write ``state_dict`` as one file or as shards with an index; returns the files written."""
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        path = directory / SINGLE_NAME
        save_file(shards[0], str(path), metadata=metadata)
        return [path]
    written, weight_map = [], {}
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    for i, shard in enumerate(shards, start=1):
        path = directory / f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata=metadata)
        weight_map.update({name: path.name for name in shard})
        written.append(path)
    index = directory / INDEX_NAME
    index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*written, index]


def fsync_tree(directory: Path) -> None:
    """Flush every file of ``directory`` and the directory itself to disk."""
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
