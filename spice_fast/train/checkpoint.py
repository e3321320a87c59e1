"""Training checkpoints: an HF model directory plus the trainer state, written atomically.

Layout: ``RUN_DIR/checkpoints/step-000010/`` holds what ``transformers.AutoModelForCausalLM`` and
``spice_fast.load`` read (config.json, safetensors, tokenizer files) and ``trainer_state.pt`` (step,
optimizer and master weights, RNG states, corpus position, config). ``RUN_DIR/checkpoints/latest``
names the newest complete one.

A checkpoint is built in a hidden ``.step-N.partial`` directory and renamed into place only when every
file is written and fsynced; ``latest`` is replaced by ``os.replace``. A crash at any point leaves the
previous checkpoint intact and ``latest`` pointing at it; the partial directory is removed on resume.
A write that fails (disk full, permissions: ``OSError`` or torch's ``RuntimeError``) removes its partial
directory at once and raises ``CheckpointWriteError``, which names the cause and the last complete one.
``trainer_state.pt`` is read with ``torch.load(weights_only=True)``: no pickled code is ever run.
Tested by tests/test_train.py (crash inside a checkpoint, then resume).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from spice_fast.weights import save as save_model
from spice_fast.weights.safetensors_io import fsync_dir, fsync_tree

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; its partial directory is gone, earlier checkpoints are intact."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    state: dict[str, Any],
    *,
    keep: int = 2,
    model_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write checkpoint ``step`` and point ``latest`` at it; keep the ``keep`` newest checkpoints.

    ``model_state``: the weights to write instead of ``model.state_dict()`` (gathered FSDP2 shards)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    partial = root / f".step-{step:06d}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        save_model(model, tokenizer, partial, state_dict=model_state)
        tmp_state = partial / (STATE_FILE + ".tmp")
        torch.save(state, tmp_state)
        os.replace(tmp_state, partial / STATE_FILE)
        fsync_tree(partial)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(partial, ignore_errors=True)  # do not leave half a checkpoint filling the disk
        previous = latest_checkpoint(run_dir)
        kept = f"the last complete one, {previous}, is intact" if previous else "there is no earlier one"
        raise CheckpointWriteError(f"could not write checkpoint {final.name} ({e}); {kept}") from e
    if final.exists():  # the same step saved again (a resumed run): the new one replaces it
        shutil.rmtree(final)
    partial.rename(final)
    _write_latest(root, final.name)
    _prune(root, keep)
    return final


def _write_latest(root: Path, name: str) -> None:
    tmp = root / "latest.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    fsync_dir(root)


def _complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / "config.json").is_file()


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir() and _complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    for _, path in list_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint ``latest`` names, or the newest complete one when ``latest`` is missing or stale."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8").strip()
        if _STEP_DIR.match(name) and _complete(root / name):
            return root / name
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partials(run_dir: str | Path) -> list[str]:
    """Delete what a crash inside ``save_checkpoint`` left behind; returns the names removed."""
    root = checkpoint_root(run_dir)
    removed = []
    if root.is_dir():
        for path in root.iterdir():
            if path.name.endswith(".partial") or ".tmp-" in path.name or path.name == "latest.tmp":
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path.name)
    return sorted(removed)


def load_state(checkpoint: Path) -> dict[str, Any]:
    path = checkpoint / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any corruption of the file: one clear error naming it
        raise ValueError(f"trainer state {str(path)!r} is unreadable ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"trainer state {str(path)!r} has no step; not a spice_fast checkpoint")
    return state
