"""Run logs: ``metrics.jsonl`` (one line per step), ``samples.jsonl``, TensorBoard scalars, console line.

Every line is flushed and fsynced when written, so a crash loses at most the step in flight. On resume
``truncate_after(step)`` drops lines of steps after the checkpoint (they are recomputed), so the logs
of a resumed run read as those of an uninterrupted one. Non-finite floats are written as ``null``
(strict JSON). TensorBoard is used when the ``tensorboard`` package is installed; otherwise the log
says so once.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def read_jsonl(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The dict lines of a JSONL file and the number of lines skipped (torn last line, garbage)."""
    rows, bad = [], 0
    if not path.is_file():
        return rows, bad
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(row, dict):
                rows.append(row)
            else:
                bad += 1
    return rows, bad


class RunLogger:
    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("tensorboard is not installed: metrics go to %s only", METRICS_FILE)
            else:
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """Keep only the lines of steps <= ``step`` (a resumed run recomputes the rest)."""
        for name in (METRICS_FILE, SAMPLES_FILE):
            path = self.run_dir / name
            if not path.exists():
                continue
            rows, _ = read_jsonl(path)
            kept = [r for r in rows if isinstance(r.get("step"), int) and r["step"] <= step]
            tmp = path.with_name(name + ".tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def _append(self, name: str, row: dict[str, Any]) -> None:
        with open(self.run_dir / name, "a", encoding="utf-8") as f:
            f.write(json.dumps(_clean(row)) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._append(METRICS_FILE, {"step": step, **metrics})
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
            self._writer.flush()

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        for sample in samples:
            self._append(SAMPLES_FILE, {"step": step, **sample})

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def console_line(step: int, num_steps: int, m: dict[str, Any]) -> str:
    def fmt(key: str, spec: str = ".3f") -> str:
        value = m.get(key)
        return "-" if value is None else format(value, spec)

    skipped = (
        f" SKIPPED ({m['skip_reason']})" if m.get("skipped") and m.get("skip_reason") != "no_signal" else ""
    )
    return (
        f"step {step}/{num_steps}  valid {fmt('challenger/valid_rate', '.2f')}  "
        f"r_C {fmt('challenger/reward_mean')}  acc {fmt('reasoner/accuracy', '.2f')}  "
        f"loss {fmt('loss', '.4g')}  |g| {fmt('grad_norm', '.3g')}  "
        f"gen {fmt('throughput/gen_tokens_per_s', '.0f')} tok/s  step {fmt('time/step', '.1f')}s{skipped}"
    )
