"""spice_fast: a custom-kernel engine for SPICE self-play reinforcement learning of language models.

Public surface: ``load`` / ``save`` for checkpoints, the model family in ``spice_fast.model``, the
Triton kernels in ``spice_fast.kernels`` (importable alone, without this package's heavier parts).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `import spice_fast.kernels` does not import transformers or the model.
    if name in ("load", "save", "CheckpointError", "DEFAULT_MODEL"):
        from spice_fast import weights

        return getattr(weights, name)
    raise AttributeError(f"module 'spice_fast' has no attribute {name!r}")


__all__ = ["CheckpointError", "DEFAULT_MODEL", "__version__", "load", "save"]
