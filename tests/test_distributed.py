"""torch.distributed: 2 CPU processes under torchrun (gloo) hold identical parameters after a few steps
and match a single-process run over the same global batch; metrics are merged across ranks."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_checkpoint

from spice_fast.train.distributed import merge_metrics

WORKER = Path(__file__).parent / "dist_worker.py"
# metrics that depend on how the work was split, or on float sums in another order
# how work was split (the replayed rows: what each rank's sampler recorded, e.g. not the rows of a
# sequence preempted and prefilled again)
_TIMING = ("time/", "throughput/gen_tokens_per_s", "update/num_micro_batches", "update/num_replayed_tokens")
_FLOAT = ("loss", "grad_norm", "clip_fraction", "mean_ratio", "approx_kl", "logprob_gap/")


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def _overrides(tmp_path, model, run):
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    for i in range(6):
        (corpus / f"d{i}.txt").write_text(f"Document {i}. " + "Sheep graze on the hill. " * (2 + i))
    # optim.eps=1: Adam's m / sqrt(v) would turn float noise in near-zero gradients into +-lr steps
    return [
        f"model.name={model}", f"run_dir={tmp_path / run}", f"corpus.source={corpus}",
        "corpus.max_doc_tokens=40", "spice.num_docs=4", "steps=3", "rollout.challenger_max_tokens=12",
        "rollout.reasoner_max_tokens=10", "rollout.max_model_len=2048", "optim.lr=1e-2", "optim.eps=1.0",
        "progress=false", "tensorboard=false", "checkpoint_every=2", "model.device=cpu",
    ]  # fmt: skip


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_ranks_match_one_process(tmp_path):
    model = tiny_checkpoint(tmp_path / "model")
    _run([sys.executable, str(WORKER), *_overrides(tmp_path, model, "single")], tmp_path)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    _run([*torchrun, str(WORKER), *_overrides(tmp_path, model, "multi")], tmp_path)

    single = load_file(tmp_path / "single" / "params-rank0.safetensors")
    rank0 = load_file(tmp_path / "multi" / "params-rank0.safetensors")
    rank1 = load_file(tmp_path / "multi" / "params-rank1.safetensors")
    initial = load_file(model / "model.safetensors")
    moved = 0.0
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), name  # the ranks never drift apart
        step = (single[name] - initial[name]).abs().max().item()
        moved = max(moved, step)
        # the same updates up to float32 sums in another order (per-rank batches, gradient all-reduce):
        # a few ulps of the weights (about 0.5 here, ulp 6e-8)
        assert (rank0[name] - single[name]).abs().max().item() <= 5e-7, name
    assert moved > 1e-4  # training happened, so the comparison can fail

    a, b = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
    assert [r["step"] for r in b] == [1, 2, 3]  # rank 0 alone logs
    for row_a, row_b in zip(a, b, strict=True):
        assert row_b["update/num_sequences"] > 0 and row_b["skipped"] == 0
        for key, value in row_a.items():
            if key.startswith(_TIMING):
                continue
            if key.startswith(_FLOAT) and value is not None:
                # the sampler-vs-trainer gap is itself float32 noise (1e-6..1e-5): compare it loosely
                abs_tol = 1e-4 if key.startswith("logprob_gap/") else 1e-6
                assert math.isclose(row_b[key], value, rel_tol=1e-3, abs_tol=abs_tol), key
            elif isinstance(value, float):
                assert math.isclose(row_b[key], value, rel_tol=1e-9), key
            else:
                assert row_b[key] == value, key
    ckpts = sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-000002", "step-000003"]

    # AdamW's moments sharded over the ranks (ZeroRedundancyOptimizer): the same parameters
    _run(
        [*torchrun, str(WORKER), *_overrides(tmp_path, model, "sharded"), "optim.shard_state=true"], tmp_path
    )
    sharded = load_file(tmp_path / "sharded" / "params-rank0.safetensors")
    assert all((sharded[n] - rank0[n]).abs().max().item() <= 5e-7 for n in rank0)
    sharded1 = load_file(tmp_path / "sharded" / "params-rank1.safetensors")
    assert all(torch.equal(sharded[n], sharded1[n]) for n in sharded)  # the broadcast keeps ranks equal

    # FSDP2 over the decoder layers (parameters, gradients, AdamW state sharded): the same parameters
    _run([*torchrun, str(WORKER), *_overrides(tmp_path, model, "fsdp"), "optim.fsdp=true"], tmp_path)
    fsdp0 = load_file(tmp_path / "fsdp" / "params-rank0.safetensors")
    fsdp1 = load_file(tmp_path / "fsdp" / "params-rank1.safetensors")
    assert all(torch.equal(fsdp0[n], fsdp1[n]) for n in fsdp0)
    assert all((fsdp0[n] - rank0[n]).abs().max().item() <= 5e-7 for n in rank0), "fsdp vs all-reduce"
    a, b = _metrics(tmp_path / "multi"), _metrics(tmp_path / "fsdp")
    for row_a, row_b in zip(a, b, strict=True):
        assert row_b["skipped"] == 0 and row_b["update/num_sequences"] == row_a["update/num_sequences"]
        assert math.isclose(row_b["grad_norm"], row_a["grad_norm"], rel_tol=1e-4)

    # either run resumes with the other number of ranks, and the two continuations agree
    _run([*torchrun, str(WORKER), "--resume", str(tmp_path / "single"), "steps=4"], tmp_path)
    _run([sys.executable, str(WORKER), "--resume", str(tmp_path / "multi"), "steps=4"], tmp_path)
    a, b = _metrics(tmp_path / "single"), _metrics(tmp_path / "multi")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("challenger/num_valid", "reasoner/pass_rate_hist", "corpus/epoch", "corpus/position"):
        assert a[3][key] == b[3][key], key
    x = load_file(tmp_path / "single" / "params-rank0.safetensors")
    y = load_file(tmp_path / "multi" / "params-rank0.safetensors")
    assert all((x[n] - y[n]).abs().max().item() <= 5e-7 for n in x)
    # the sharded runs' checkpoints hold the whole optimizer state: one process continues each
    for run in ("sharded", "fsdp"):
        _run([sys.executable, str(WORKER), "--resume", str(tmp_path / run), "steps=4"], tmp_path)
        z = load_file(tmp_path / run / "params-rank0.safetensors")
        assert all((z[n] - y[n]).abs().max().item() <= 5e-7 for n in y), run
    # and two FSDP2 ranks continue a one-process checkpoint
    resume_fsdp = ["--resume", str(tmp_path / "multi"), "steps=5", "optim.fsdp=true"]
    _run([*torchrun, str(WORKER), *resume_fsdp], tmp_path)
    _run([sys.executable, str(WORKER), "--resume", str(tmp_path / "single"), "steps=5"], tmp_path)
    x = load_file(tmp_path / "single" / "params-rank0.safetensors")
    y = load_file(tmp_path / "multi" / "params-rank0.safetensors")
    assert all((x[n] - y[n]).abs().max().item() <= 5e-7 for n in x)


def test_merge_weights_means_by_their_counts():
    r0 = {
        "challenger/num_samples": 8, "challenger/valid_rate": 0.5, "challenger/invalid/unparseable": 4,
        "reasoner/num_questions": 4, "reasoner/accuracy": 0.25, "reasoner/pass_rate_hist": [1, 1, 2],
        "update/num_tokens": 100, "clip_fraction": 0.1, "logprob_gap/max": 0.01, "time/rollout": 2.0,
        "throughput/gen_tokens": 400, "throughput/gen_tokens_per_s": 200.0, "loss": 0.5, "lr": 1e-6,
    }  # fmt: skip
    r1 = {
        "challenger/num_samples": 8, "challenger/valid_rate": 0.0, "challenger/invalid/unparseable": 8,
        "reasoner/num_questions": 0, "reasoner/accuracy": None, "reasoner/pass_rate_hist": [0, 0, 0],
        "update/num_tokens": 300, "clip_fraction": 0.3, "logprob_gap/max": 0.02, "time/rollout": 4.0,
        "throughput/gen_tokens": 200, "throughput/gen_tokens_per_s": 50.0, "loss": 0.25, "lr": 1e-6,
    }  # fmt: skip
    m = merge_metrics([r0, r1], num_reasoner_samples=2)
    assert m["challenger/num_samples"] == 16 and m["challenger/valid_rate"] == 0.25
    assert m["challenger/invalid/unparseable"] == 12 and m["reasoner/accuracy"] == 0.25
    assert m["reasoner/pass_rate_hist"] == [1, 1, 2] and m["clip_fraction"] == pytest.approx(0.25)
    assert m["logprob_gap/max"] == 0.02 and m["time/rollout"] == 4.0 and m["loss"] == 0.75
    assert m["throughput/gen_tokens_per_s"] == 150.0 and m["lr"] == 1e-6
