"""PNG plots of a training run from its ``metrics.jsonl`` (one JSON object per training step).

``read_metrics(run_dir)`` returns the rows sorted by ``step``; a step logged twice (a resumed run
re-logs it) keeps its last occurrence. Bad lines (invalid JSON such as a line cut by a crash, a
non-object, no integer ``step``) are skipped and counted with one warning. Values that are null,
NaN or not numbers count as absent; unknown keys are ignored.

``plot_run(run_dir)`` writes one figure per entry of ``FIGURES`` under ``run_dir/plots``: line
panels, stacked areas (invalid-reason counts, phase times) and a heatmap of the reasoner pass-rate
histogram (the fraction of questions with 0..K of K answers right, per step). A figure whose keys
are all absent is skipped with a note. Matplotlib (the ``plot`` extra) is imported on use, through
its object API and Agg canvas: no pyplot state, no change of the caller's backend.
``spice-fast plot RUN_DIR`` is ``cmd_plot``.

Tests: ``pytest tests/test_plot.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spice_fast.spice.parsing import INVALID_REASONS

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
HIST_KEY = "reasoner/pass_rate_hist"
BAD_LINE_REASONS = ("invalid_json", "not_an_object", "no_step")
INVALID_KEYS = tuple(f"challenger/invalid/{reason}" for reason in INVALID_REASONS)


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[str, ...]  # one line (or one stacked band) per key
    kind: str = "line"  # "line" | "stack" (stacked areas, absent = 0) | "hist" (pass-rate heatmap)
    total: str | None = None  # drawn as a dashed line over a stack


FIGURES: dict[str, tuple[Panel, ...]] = {
    "rewards.png": (Panel("challenger reward (mean)", ("challenger/reward_mean",)),),
    "valid_rate.png": (
        Panel("challenger valid rate", ("challenger/valid_rate",)),
        Panel("invalid challenger outputs (count)", INVALID_KEYS, "stack"),
    ),
    "pass_rates.png": (
        Panel("reasoner pass rate (mean over questions)", ("reasoner/pass_rate_mean",)),
        Panel("fraction of questions with k of K answers right", (HIST_KEY,), "hist"),
    ),
    "accuracy.png": (Panel("reasoner accuracy", ("reasoner/accuracy",)),),
    "lengths.png": (Panel("mean length (tokens)", ("length/challenger_mean", "length/reasoner_mean")),),
    "throughput.png": (
        Panel("generated tokens/s", ("throughput/gen_tokens_per_s",)),
        Panel(
            "seconds per step by phase",
            ("time/rollout", "time/matching", "time/logprob", "time/update"),
            "stack",
            total="time/step",
        ),
    ),
    "loss.png": (
        Panel("loss", ("loss",)),
        Panel("grad norm", ("grad_norm",)),
        Panel("clip fraction", ("clip_fraction",)),
        Panel("log-prob gap, sampler vs trainer", ("logprob_gap/mean", "logprob_gap/max")),
        Panel("learning rate", ("lr",)),
    ),
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def metrics_path(run_dir: str | os.PathLike) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run folder not found: {str(run_dir)!r}")
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"no {METRICS_FILE} in run folder {str(run_dir)!r}")
    return path


def read_metrics(run_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Rows of ``run_dir/metrics.jsonl`` by step (last occurrence of a step wins) and
    ``{reason: count}`` of the skipped lines."""
    path = metrics_path(run_dir)
    rows: dict[int, dict[str, Any]] = {}
    skipped: Counter[str] = Counter()
    first_bad: list[int] = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        reason = None
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            reason = "invalid_json"
        else:
            if not isinstance(obj, dict):
                reason = "not_an_object"
            elif not isinstance(obj.get("step"), int) or isinstance(obj.get("step"), bool):
                reason = "no_step"
        if reason is None:
            rows[obj["step"]] = obj
        else:
            skipped[reason] += 1
            first_bad.append(number)
    counts = {r: skipped[r] for r in BAD_LINE_REASONS if skipped[r]}
    if counts:
        lines = ", ".join(map(str, first_bad[:5])) + (", ..." if len(first_bad) > 5 else "")
        logger.warning("skipped %d bad lines of %s (line %s): %s", len(first_bad), path, lines, counts)
    return [rows[s] for s in sorted(rows)], counts


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of the rows where ``key`` holds a finite number."""
    points = [(row["step"], _number(row.get(key))) for row in rows]
    points = [(s, v) for s, v in points if v is not None]
    return [s for s, _ in points], [v for _, v in points]


def pass_rate_fractions(rows: list[dict[str, Any]]) -> tuple[list[int], list[list[float]]]:
    """Steps with a usable histogram and, per step, the fraction of questions with 0..K right
    (padded with zeros to the largest K seen)."""
    steps, hists = [], []
    for row in rows:
        hist = row.get(HIST_KEY)
        if not isinstance(hist, list) or len(hist) < 2:
            continue
        counts = [_number(c) for c in hist]
        if any(c is None or c < 0 for c in counts) or sum(counts) <= 0:
            continue
        steps.append(row["step"])
        hists.append([c / sum(counts) for c in counts])
    width = max((len(h) for h in hists), default=0)
    return steps, [h + [0.0] * (width - len(h)) for h in hists]


def _has_data(rows: list[dict[str, Any]], panel: Panel) -> bool:
    if panel.kind == "hist":
        return bool(pass_rate_fractions(rows)[0])
    return any(series(rows, key)[0] for key in (*panel.keys, *([panel.total] if panel.total else [])))


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plotting needs matplotlib: pip install spice-fast[plot] ({e})") from e
    return Figure, FigureCanvasAgg


def _draw_lines(ax, rows: list[dict[str, Any]], panel: Panel) -> None:
    for key in panel.keys:
        steps, values = series(rows, key)
        if steps:
            ax.plot(steps, values, label=key, marker="." if len(steps) < 50 else None)


def _draw_stack(ax, rows: list[dict[str, Any]], panel: Panel) -> None:
    present = [k for k in panel.keys if series(rows, k)[0]]
    steps = sorted({s for k in present for s in series(rows, k)[0]})
    if present:
        by_step = {row["step"]: row for row in rows}
        bands = [[_number(by_step[s].get(k)) or 0.0 for s in steps] for k in present]
        ax.stackplot(steps, bands, labels=[k.rsplit("/", 1)[-1] for k in present], alpha=0.8)
    if panel.total:
        total_steps, totals = series(rows, panel.total)
        if total_steps:
            ax.plot(total_steps, totals, "k--", linewidth=1, label=panel.total)


def _draw_hist(fig, ax, rows: list[dict[str, Any]]) -> None:
    steps, fractions = pass_rate_fractions(rows)
    num_k = len(fractions[0]) - 1
    # Cell edges halfway between logged steps, so uneven logging intervals stay honest.
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:], strict=False)]
    x_edges = [steps[0] - 0.5, *mids, steps[-1] + 0.5] if len(steps) > 1 else [steps[0] - 0.5, steps[0] + 0.5]
    y_edges = [k - 0.5 for k in range(num_k + 2)]
    grid = [[fractions[j][k] for j in range(len(steps))] for k in range(num_k + 1)]  # [K+1, steps]
    mesh = ax.pcolormesh(x_edges, y_edges, grid, cmap="viridis", vmin=0.0, vmax=1.0, shading="flat")
    ax.set_ylabel(f"answers right of {num_k}")
    fig.colorbar(mesh, ax=ax, label="fraction of questions")


def _integer_locator():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _draw_figure(name: str, panels: tuple[Panel, ...], rows: list[dict[str, Any]], path: Path) -> None:
    figure_cls, canvas_cls = _matplotlib()
    fig = figure_cls(figsize=(9, 2.8 * len(panels) + 0.6), layout="constrained")
    canvas_cls(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    # updates skipped for a non-finite loss or gradient; "no_signal" (all advantages zero) is normal
    skipped_steps = [
        r["step"] for r in rows if r.get("skipped") and r.get("skip_reason", "nonfinite") != "no_signal"
    ]
    for ax, panel in zip(axes, panels, strict=True):
        if panel.kind == "hist":
            _draw_hist(fig, ax, rows)
        elif panel.kind == "stack":
            _draw_stack(ax, rows, panel)
        else:
            _draw_lines(ax, rows, panel)
        if name == "loss.png" and skipped_steps:
            for s in skipped_steps:
                ax.axvline(s, color="red", alpha=0.3, linewidth=1)
        ax.set_title(panel.title, fontsize=10)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and (len(panel.keys) > 1 or panel.total):
            ax.legend(fontsize=8, loc="best")
    axes[-1].xaxis.set_major_locator(_integer_locator())
    axes[-1].set_xlabel("step" + ("  (red: skipped updates)" if name == "loss.png" and skipped_steps else ""))
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_rows(rows: list[dict[str, Any]], out_dir: str | os.PathLike) -> list[Path]:
    """Write the figures of ``FIGURES`` that have data under ``out_dir``; returns the written paths."""
    _matplotlib()  # fail before making folders when matplotlib is missing
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"plot output {str(out)!r} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, panels in FIGURES.items():
        kept = tuple(p for p in panels if _has_data(rows, p))
        if not kept:
            logger.info("%s skipped: none of %s logged", name, [k for p in panels for k in p.keys])
            continue
        _draw_figure(name, kept, rows, out / name)
        written.append(out / name)
    return written


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """``read_metrics`` then ``plot_rows`` into ``out_dir`` (default ``run_dir/plots``)."""
    rows, _ = read_metrics(run_dir)
    return plot_rows(rows, out_dir if out_dir is not None else Path(run_dir) / "plots")


def cmd_plot(args: argparse.Namespace) -> int:
    """``spice-fast plot RUN_DIR [--out DIR]``: print each written file, note each skipped figure."""
    rows, skipped = read_metrics(args.run_dir)
    try:
        written = plot_rows(rows, args.out if args.out is not None else Path(args.run_dir) / "plots")
    except ImportError as e:  # one clear line from the command, not a traceback
        raise ValueError(str(e)) from e
    names = {p.name for p in written}
    for name in FIGURES:
        if name not in names:
            print(f"skipped {name}: none of its metrics are logged")
    for path in written:
        print(path)
    bad = f", {sum(skipped.values())} bad lines skipped {skipped}" if skipped else ""
    print(f"{len(written)} plots from {len(rows)} steps{bad}")
    return 0
