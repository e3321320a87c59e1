#!/usr/bin/env bash
# GPU checks: the GPU tests and GPU benchmarks, each writing its log under "$OUT" (default runs/gpu_check),
# with one line per step in "$OUT/summary.txt". The whole script must finish in under 8 minutes on an H200.
#
# Structure: one clearly separated block per area, each a few `step NAME TIMEOUT_S CMD...` lines with a
# timeout that bounds it. To add an area, append a block before the final `exit` and keep the total of
# all timeouts under 8 minutes (now 460 s, plus the install's 120 s on a bare machine; on an H200 the
# whole script took 4.5 minutes, install included). Tests do not stop at the first failure: one run
# should show them all.
#
#   OUT=/tmp/gpu bash benches/gpu_check.sh
#   ONLY="kernels_tests bench_grpo_loss" OUT=/tmp/gpu bash benches/gpu_check.sh   # a rerun of some steps
#
# On a machine where spice_fast is not installed yet, it is installed in place first (editable, from the
# packages already there: no index, no build isolation). Liger-Kernel and TRL are used when importable.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
: > "$OUT/summary.txt"
status=0

step() {  # step NAME TIMEOUT_S CMD...: runs CMD with a time limit, log in $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc ${limit}s-limit took=$((SECONDS - start))s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
"$PY" -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())" \
    > "$OUT/versions.txt" 2>&1 || true
if ! "$PY" -c "import spice_fast._matcher, spice_fast._cpu_ops, spice_fast.kernels" 2> /dev/null; then
    step install 120 "$PY" -m pip install --no-deps --no-build-isolation --no-index -e .
fi
# Test options: 8 workers when pytest-xdist is there (Triton compiles in parallel; 2 CPU threads each, or
# 8 workers x all cores of torch threads crawl), a per-test limit when pytest-timeout is (it prints the
# stacks of a test that hangs).
TEST_OPTS=(-q -rfE -p no:cacheprovider)
"$PY" -c "import pytest_timeout" 2> /dev/null && TEST_OPTS+=(--timeout 45)
PAR=(env)  # prefix of the test runs that may run in parallel
if "$PY" -c "import xdist" 2> /dev/null; then
    PAR=(env OMP_NUM_THREADS=2)
    TEST_OPTS_PAR=("${TEST_OPTS[@]}" -n 8)
else
    TEST_OPTS_PAR=("${TEST_OPTS[@]}")
fi

# ==== training kernels (issue 4): fused_linear_logprob, policy_loss, fused_grpo_loss ==== budget 190 s
# Tests run the Triton kernels compiled (plus the int64-offset test marked gpu). Benchmarks: SmolLM2 and
# Qwen3-4B shapes, and the GPU target (bf16, N=8192, H=4096, V=151936) with TFLOP/s vs the bf16 peak.
step kernels_tests 60 "${PAR[@]}" "$PY" -m pytest "${TEST_OPTS_PAR[@]}" tests/test_kernels_logprob.py tests/test_kernels_grpo.py \
    tests/test_kernels_fused_grpo.py
step bench_grpo_loss 90 "$PY" benches/bench_grpo_loss.py --models smollm2,qwen3-4b,big --n 8192 --repeat 5 \
    --methods naive,trl,unfused,fused,fused2,liger,liger8
step bench_logprob 40 "$PY" benches/bench_logprob.py --n 4096,16384 --qwen-n 8192 --repeat 5
# ==== end training kernels ====

# ==== model and rollout engine (issues 2, 3) ==== budget 175 s
# GPU tests: bf16 parity, flash-attn varlen and paged paths, the Triton decode kernel compiled, the engine.
step engine_tests 60 "${PAR[@]}" "$PY" -m pytest "${TEST_OPTS_PAR[@]}" tests/test_model.py tests/test_paged_attention.py \
    tests/test_engine.py
step bench_paged_attention 25 "$PY" benches/bench_paged_attention.py --batch 64 --ctx 512,2048,8192
step bench_model 30 "$PY" benches/bench_model.py --device cuda --dtype bfloat16 --model qwen3-0.6b
step bench_sampler 60 "$PY" benches/bench_sampler.py --random qwen3-0.6b --device cuda --dtype bfloat16
# ==== end model and rollout engine ====

# ==== trainer (issues 6, 7) ==== budget 95 s
# bf16 parameters read by the engine, fp32 masters updated in place, on a tiny model (test marked gpu);
# the TRL backend's parity test on whatever device TRL picks.
step trainer_gpu_test 50 "$PY" -m pytest "${TEST_OPTS[@]}" -p no:xdist \
    tests/test_train.py::test_gpu_run_trains_bf16_parameters_from_fp32_masters
step trl_tests 45 "${PAR[@]}" "$PY" -m pytest "${TEST_OPTS_PAR[@]}" tests/test_integrations.py
# ==== end trainer ====

exit "$status"
