"""Backend switch and lazy Triton compilation shared by the training kernels.

Which path runs (one switch, STYLE.md):
- ``backend="triton"`` / ``"torch"`` on a call forces a path; ``None`` (the default) asks the environment.
- ``SPICE_FAST_KERNELS=triton|torch|auto`` (default ``auto``): ``auto`` picks Triton when the tensors are
  on CUDA and Triton imports, and the chunked PyTorch path otherwise (the CPU path).
- Triton on CPU tensors needs ``TRITON_INTERPRET=1`` (the interpreter); forcing Triton without it on a CPU
  raises ``ValueError`` rather than silently falling back.

Kernels are decorated lazily (``lazy_jit``): ``triton.jit`` reads ``TRITON_INTERPRET`` when it decorates,
and the kernel modules bind ``triton.language`` (their global ``tl``) only at the first launch, so
``import spice_fast.kernels`` never imports Triton. The interpreter also needs the variable set before
Triton itself is first imported (its standard library is jitted then); ``interpreter_ready`` checks it.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def pick_backend(backend: str | None, *tensors: torch.Tensor) -> str:
    """Resolve ``backend`` (argument, then ``SPICE_FAST_KERNELS``) to ``"triton"`` or ``"torch"``."""
    choice = backend if backend is not None else os.environ.get("SPICE_FAST_KERNELS", "auto").lower()
    if choice not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} (or SPICE_FAST_KERNELS), got {choice!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if choice == "torch":
        return "torch"
    if choice == "auto":
        return "triton" if on_cuda and triton_available() else "torch"
    if not triton_available():
        raise ValueError("backend='triton' was forced but triton is not installed")
    if not on_cuda and not interpreter_ready():
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")
    return "triton"


# The CPU fast paths take plain tensors and parameters, not DTensor or other subclasses.
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def plain_cpu_float32(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is a plain tensor or parameter on the CPU in float32: what the C++ and
    oneDNN CPU paths take (anything else goes to the op's torch reference)."""
    return all(
        type(t) in PLAIN_TENSORS and t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors
    )


CPP_BACKENDS = ("auto", "cpp", "torch")
_cpu_ops_module: list = []  # [module or None], filled on first use


def cpu_ops():
    """``spice_fast._cpu_ops`` (the C++ layer kernels of csrc/ops: RMSNorm, RoPE, SwiGLU), or None
    where it is not built (it is part of ``pip install .``); said once in the log."""
    if not _cpu_ops_module:
        try:
            from spice_fast import _cpu_ops as module
        except ImportError:
            module = None
            log.warning("spice_fast._cpu_ops is not built: RMSNorm, RoPE and SwiGLU run as torch operations")
        _cpu_ops_module.append(module)
    return _cpu_ops_module[0]


def cpu_ops_available() -> bool:
    return cpu_ops() is not None


def pick_cpp_backend(backend: str | None, env: str) -> str:
    """Resolve ``backend`` (argument, then the environment variable ``env``) to ``"cpp"`` or ``"torch"``:
    ``auto`` takes the C++ kernels when built; forcing ``cpp`` without them raises ``ValueError``."""
    choice = backend if backend is not None else os.environ.get(env, "auto").lower()
    if choice not in CPP_BACKENDS:
        raise ValueError(f"backend must be one of {CPP_BACKENDS} (or {env}), got {choice!r}")
    if choice == "torch":
        return "torch"
    if cpu_ops_available():
        return "cpp"
    if choice == "cpp":
        raise ValueError("backend='cpp' was forced but spice_fast._cpu_ops is not built")
    return "torch"


def interpreter_ready() -> bool:
    """True when Triton kernels can run interpreted on CPU tensors in this process."""
    if not interpret_mode() or not triton_available():
        return False
    import triton.language as tl

    return type(tl.max).__name__ == "InterpretedFunction"


class lazy_jit:  # noqa: N801 - used like the triton.jit decorator it wraps
    """``triton.jit`` applied at the first launch, once per value of TRITON_INTERPRET.

    Kernels decorated this way must not call other ``@triton.jit`` helpers (the compiler would see
    this wrapper, not a JITFunction), so each kernel is self-contained.
    """

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: dict[bool, object] = {}

    def __getitem__(self, grid):
        mode = interpret_mode()
        kernel = self._compiled.get(mode)
        if kernel is None:
            import triton
            import triton.language

            self.fn.__globals__["tl"] = triton.language
            kernel = self._compiled[mode] = triton.jit(self.fn)
        return kernel[grid]


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def default_block_v(num_cols: int) -> int:
    # Under the interpreter a small block exercises the multi-block online softmax on test shapes.
    if interpret_mode() and num_cols <= 8192:
        return min(256, next_pow2(num_cols))
    return min(4096, next_pow2(num_cols))


def default_chunk_rows(num_rows: int, vocab: int, backend: str) -> int:
    """Rows per vocabulary GEMM chunk: the [chunk, V] logits block is the only vocabulary-sized buffer.

    GPU: at least 1024 rows so cuBLAS runs near peak, capped near 1 GiB of bf16 logits.
    CPU: up to 512 rows or 128 MiB of fp32 logits (512 x 49152 = 96 MiB): fewer rows make MKL's GEMMs
    and the weight-gradient updates visibly slower; more would pass 1/8 of the naive step's memory.
    """
    if backend == "triton" and not interpret_mode():
        rows = max(1024, (1 << 29) // max(vocab, 1))
    else:
        rows = max(16, min(512, (1 << 25) // max(vocab, 1)))
    return max(1, min(rows, num_rows))


def check_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
