"""Every Triton kernel compiles for an H100 / H200 (sm_90) on a machine without a GPU.

The CPU tests run the kernels under Triton's interpreter, which executes their Python with numpy and
never runs the compiler: a kernel can pass all of them and still fail to compile (a loop-carried value
whose type changes, a dot below 16 x 16, an op the interpreter accepts and the code generator does
not). ``triton.compile`` with a ``GPUTarget`` runs the whole pipeline down to ptxas's cubin with no
driver, so CI on a CPU catches those. One case per kernel and constexpr branch, at the shapes the
launchers pick on a GPU.

The compiler runs in a subprocess without ``TRITON_INTERPRET``: under the interpreter (which
tests/conftest.py switches on) Triton's reductions are replaced by interpreted functions that the code
generator cannot call. Run: python -m pytest -q tests/test_triton_compile.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from spice_fast.kernels._utils import next_pow2, triton_available

SM90 = ("cuda", 90, 32)  # backend, compute capability, warp size
VOCAB_BLOCK = 4096  # default_block_v on a GPU for any real vocabulary
PAGED = [  # dtype, group, head_dim, block_size, normalize (one split, else partial results + merge)
    ("bf16", 1, 128, 16, True),
    ("bf16", 4, 128, 16, False),  # Qwen3: 32 query heads over 8 KV heads, split over the context
    ("bf16", 7, 24, 5, True),  # odd group, head_dim and block size
    ("bf16", 8, 256, 16, False),
    ("fp32", 3, 64, 16, True),  # SmolLM2's GQA in fp32: IEEE dots
]


def cases() -> dict[str, tuple[str, str, dict, dict]]:
    """id -> (kernels module, kernel name, constexprs, pointer types)."""
    out = {}
    for dtype in ("bf16", "fp32"):
        logits = {"logits_ptr": f"*{dtype}", "targets_ptr": "*i64"}
        for entropy in (False, True):
            for grad in (False, True):
                meta = {"BLOCK_V": VOCAB_BLOCK, "ENTROPY": entropy, "GRAD": grad}
                name = f"logprob_{'grad' if grad else 'fwd'}-{dtype}-entropy{entropy}"
                out[name] = ("logprob", "_logprob_rows_kernel", meta, logits)
        for flag in (False, True):
            meta = {"BLOCK_V": VOCAB_BLOCK, "HAS_REF": flag, "HAS_ISW": flag}
            out[f"fused_grpo-{dtype}-extras{flag}"] = ("fused_grpo", "_fused_grpo_kernel", meta, logits)
    for flag in (False, True):
        meta = {"BLOCK": 1024, "HAS_REF": flag, "HAS_ISW": flag}
        out[f"policy_fwd-extras{flag}"] = ("grpo", "_policy_loss_fwd_kernel", meta, {})
        out[f"policy_bwd-extras{flag}"] = ("grpo", "_policy_loss_bwd_kernel", meta, {})
    from spice_fast.kernels.paged_attention import decode_meta

    for dtype, group, head_dim, block_size, normalize in PAGED:
        name = f"paged-{dtype}-g{group}-d{head_dim}-b{block_size}-norm{normalize}"
        meta = decode_meta(group, head_dim, block_size, pages_per_split=8, fp32=dtype == "fp32")
        pointers = {f"{t}_ptr": f"*{dtype}" for t in ("q", "k", "v")} | {"tables_ptr": "*i32"}
        pointers |= {"lens_ptr": "*i32", "out_ptr": f"*{dtype}" if normalize else "*fp32"}
        out[name] = ("paged_attention", "_paged_decode_kernel", {**meta, "NORMALIZE": normalize}, pointers)
        if not normalize:
            merge = {"NUM_SPLITS": 5, "HEAD_DIM": head_dim, "BLOCK_S": 8, "BLOCK_D": next_pow2(head_dim)}
            out[f"merge-{dtype}-d{head_dim}"] = (
                "paged_attention", "_merge_splits_kernel", merge, {"out_ptr": f"*{dtype}"}
            )  # fmt: skip
    return out


def compile_for_sm90(module: str, kernel_name: str, constexprs: dict, pointers: dict[str, str]) -> int:
    """Compile one kernel, every ``*_ptr`` typed by ``pointers`` (default fp32), ``stride_*`` and
    ``num_*`` as int64, the other runtime arguments as fp32. Returns the cubin's size in bytes."""
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    lazy_kernel = getattr(importlib.import_module(f"spice_fast.kernels.{module}"), kernel_name)
    lazy_kernel.fn.__globals__["tl"] = tl
    kernel = triton.jit(lazy_kernel.fn)
    unknown = set(constexprs) - set(kernel.arg_names)
    if unknown:
        raise TypeError(f"not parameters of {kernel_name}: {sorted(unknown)}")
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = pointers.get(name, "*fp32")
        elif name.startswith(("stride_", "num_")):
            signature[name] = "i64"
        else:
            signature[name] = "fp32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constexprs), target=GPUTarget(*SM90))
    return len(compiled.asm.get("cubin") or b"")


@pytest.fixture(scope="module")
def results() -> dict[str, str]:
    """Every case compiled in one subprocess: id -> "ok" or the error. Skips where the toolchain
    (Triton's NVIDIA backend, its bundled ptxas) cannot build even the first kernel."""
    if not triton_available():
        pytest.skip("Triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise AssertionError(
            f"the compile subprocess printed no result:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        )
    found = json.loads(lines[-1])
    if "toolchain" in found:
        pytest.skip(f"Triton cannot compile for sm_90 here: {found['toolchain']:.300}")
    return found


@pytest.mark.parametrize("case", list(cases()))
def test_kernel_compiles_for_sm90(results, case):
    assert results.get(case) == "ok", f"{case}: {results.get(case, 'not compiled')}"


def probe_toolchain() -> None:
    """Compile a kernel of one store: fails only where Triton cannot build for sm_90 at all."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def probe(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32))

    source = ASTSource(probe, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, constexprs={"BLOCK": 128})
    triton.compile(source, target=GPUTarget(*SM90))


def main() -> None:
    """The subprocess: compile every case, print one JSON line of results."""
    try:
        probe_toolchain()
    except Exception as err:  # noqa: BLE001 - whatever stops a trivial kernel is the toolchain's
        print(json.dumps({"toolchain": repr(err)}))
        return
    all_cases = cases()
    found = {}
    for case, spec in all_cases.items():
        try:
            found[case] = "ok" if compile_for_sm90(*spec) > 0 else "no cubin produced"
        except Exception as err:  # noqa: BLE001 - reported per case by the test
            found[case] = f"{type(err).__name__}: {err}"[:3000]
    print(json.dumps(found))


if __name__ == "__main__":
    main()
