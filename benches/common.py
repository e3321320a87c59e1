"""Shared benchmark helpers: timing with warm-up and median, peak memory, a table, one JSON line.

Every benchmark times its baseline in the same run and prints the ratio (STYLE.md).
"""

from __future__ import annotations

import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(
    fn: Callable[[], object], *, device: torch.device | str = "cpu", warmup: int = 2, repeat: int = 5
) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    device: torch.device | str = "cpu",
    warmup: int = 2,
    repeat: int = 5,
) -> dict[str, float]:
    """Median wall time of each function, timed in alternation so that load on a shared machine
    affects all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_memory(fn: Callable[[], object], device: torch.device | str = "cpu") -> int | None:
    """Peak extra bytes allocated while ``fn()`` runs: CUDA allocator stats, or the CPU profiler."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Replay allocations in order to find the high-water mark of live bytes. Self bytes only: an op
    # also reports the allocations of the ops it calls (matmul -> mm), which would count them twice.
    # An op's own allocations are placed at its start, its own frees at its end (autograd's
    # evaluate_function frees its inputs after the backward op it wraps has allocated its output).
    changes = sorted(
        (e.time_range.start if e.self_cpu_memory_usage > 0 else e.time_range.end, e.self_cpu_memory_usage)
        for e in prof.events()
        if e.self_cpu_memory_usage != 0
    )
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def git_revision() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "triton", "transformers", "spice-fast"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def print_json(bench: str, device: torch.device | str, results: list[dict], **extra: object) -> None:
    record = {
        "bench": bench,
        "device": device_name(device),
        "versions": package_versions(),
        "git": git_revision(),
        "results": results,
        **extra,
    }
    print(json.dumps(record))


# Dense bf16 tensor-core peak, FLOP/s, by device-name substring (vendor data sheets, no sparsity).
BF16_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "4090": 165e12,
}


def bf16_peak_flops(device: torch.device | str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when unknown (CPU or an unlisted GPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in BF16_PEAK_FLOPS.items() if key in name), None)


def measured_gemm_flops(
    device: torch.device | str, dtype: torch.dtype = torch.bfloat16, size: int = 8192
) -> float:
    """FLOP/s of one square ``size`` matmul through PyTorch (cuBLAS) on this device, measured now: the
    ceiling a GEMM-bound kernel can reach here, beside the datasheet peak. Median of 10 after 3 warm-ups."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = time_interleaved({"mm": lambda: a @ b}, device=device, warmup=3, repeat=10)["mm"]
    return 2 * size**3 / seconds


class PeakMemory:
    """Peak extra bytes over a ``with`` block, cheap enough to wrap a timed run (no profiler).

    CUDA: the allocator's peak minus what was allocated at the start. CPU (Linux): the process's peak
    resident set (VmHWM, reset through ``/proc/self/clear_refs``) minus the resident set at the start,
    after ``malloc_trim`` has handed freed heap back, so memory kept by an earlier block is not reused
    unseen. ``bytes`` is None where neither is available.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.bytes: int | None = None
        self._base: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
            return self
        _malloc_trim()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS (Linux >= 4.0)
            self._base = _proc_status_bytes("VmRSS")
        except OSError:
            self._base = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self._base
        else:
            self.bytes = _proc_status_bytes("VmHWM") - self._base


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"/proc/self/status has no {key}")
