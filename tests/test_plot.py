"""spice-fast plot: figures from a synthetic metrics.jsonl with the faults of a real run's log."""

import json
import logging
import math
import sys

import pytest

from spice_fast import cli
from spice_fast.plot import FIGURES, pass_rate_fractions, plot_run, read_metrics, series
from spice_fast.spice.parsing import INVALID_REASONS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED = ["rewards.png", "valid_rate.png", "pass_rates.png", "accuracy.png", "throughput.png", "loss.png"]


def metrics_row(step: int) -> dict:
    row = {
        "step": step,
        "challenger/valid_rate": 0.5 + 0.04 * step,
        "challenger/reward_mean": 0.1 * step,
        "reasoner/accuracy": 0.3 + 0.02 * step,
        "reasoner/pass_rate_mean": 0.3 + 0.02 * step,
        "reasoner/pass_rate_hist": [4 - step % 4, 2, 3, 1, step % 5],
        "length/challenger_mean": 100.0 + step,
        "length/reasoner_mean": 200.0 - step,
        "throughput/gen_tokens_per_s": 1000.0 + 10 * step,
        "time/rollout": 3.0,
        "time/matching": 0.1,
        "time/logprob": 0.5,
        "time/update": 1.0,
        "time/step": 4.7,
        "loss": 1.0 / (step + 1),
        "grad_norm": 0.5,
        "clip_fraction": 0.01 * step,
        "logprob_gap/mean": 1e-4,
        "logprob_gap/max": 1e-3,
        "lr": 1e-6,
        "skipped": 1 if step == 4 else 0,
        "some/unknown_key": "ignored",
    }
    row.update({f"challenger/invalid/{reason}": step % 3 for reason in INVALID_REASONS})
    return row


def write_run(run_dir, lines):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("\n".join(lines))
    return run_dir


@pytest.fixture
def run_dir(tmp_path):
    lines = [json.dumps(metrics_row(s)) for s in range(8)]
    lines.insert(3, json.dumps({**metrics_row(2), "loss": 99.0}))  # step 2 re-logged by a resumed run
    lines.append(json.dumps({"step": 8, "loss": 0.1, "grad_norm": None, "lr": float("nan")}))  # keys missing
    lines.append("[1, 2]")  # not an object
    lines.append(json.dumps({"loss": 1.0}))  # no step
    lines.append(json.dumps(metrics_row(9))[:40])  # cut by a crash
    return write_run(tmp_path / "run", lines)


def test_read_metrics_keeps_the_last_occurrence_and_counts_bad_lines(run_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="spice_fast.plot"):
        rows, skipped = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(9))
    assert rows[2]["loss"] == 99.0
    assert skipped == {"invalid_json": 1, "not_an_object": 1, "no_step": 1}
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert series(rows, "grad_norm")[0] == list(range(8))  # null and NaN are absent
    assert series(rows, "lr")[0] == list(range(8))
    steps, fractions = pass_rate_fractions(rows)
    assert steps == list(range(8)) and all(math.isclose(sum(f), 1.0) for f in fractions)


def test_plot_command_writes_valid_pngs(run_dir, capsys):
    assert cli.main(["plot", str(run_dir)]) == 0
    out = capsys.readouterr().out
    for name in EXPECTED:
        path = run_dir / "plots" / name
        data = path.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 10_000, name
        assert str(path) in out
    assert "3 bad lines skipped" in out
    assert not list((run_dir / "plots").glob(".*"))


def test_absent_figures_are_skipped_with_a_note(tmp_path, capsys):
    rows = [{"step": s, "loss": 1.0 / (s + 1), "reasoner/accuracy": None} for s in range(3)]
    run = write_run(tmp_path / "run", [json.dumps(r) for r in rows])
    out_dir = tmp_path / "figs"
    assert cli.main(["plot", str(run), "--out", str(out_dir)]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in out_dir.iterdir()) == ["loss.png"]
    for name in set(FIGURES) - {"loss.png"}:
        assert f"skipped {name}" in out
    assert plot_run(run, tmp_path / "again") == [tmp_path / "again" / "loss.png"]


def test_missing_run_or_metrics_is_one_error_line(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "spice-fast: error:" in err and "nope" in err and "Traceback" not in err
    (tmp_path / "empty_run").mkdir()
    assert cli.main(["plot", str(tmp_path / "empty_run")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_missing_matplotlib_says_how_to_install(run_dir, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    assert cli.main(["plot", str(run_dir)]) == 2
    assert "pip install spice-fast[plot]" in capsys.readouterr().err
