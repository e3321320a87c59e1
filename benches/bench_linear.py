"""CPU dense layers: ``spice_fast.kernels.linear`` (the C++ small-row GEMM for decode-sized calls
without autograd, oneDNN for large weights otherwise) against torch's ``F.linear`` (MKL sgemm), and
the C++ SwiGLU against ``F.silu(g) * u``, in one run.

The shapes are those of the default model (SmolLM2-135M: hidden 576, MLP 1536, KV 192, vocabulary
49152) at a sweep of row counts: 1, 8 and 32 are decode steps (one row per sequence), 512 and 2583 a
training micro-batch. ``cold`` cycles through enough distinct weight matrices (about 100 MB) that
every product reads its weights from memory, as a decode step over 30 layers does; ``hot`` reuses one.
Each line times the forward product (``fwd``), or the forward and the backward to the input
(``fwd+dgrad``, the weight frozen). spice_fast's side is ``linear`` as the model calls it (its
``path`` column says which kernel that is), so shapes it leaves to torch (small weights in training,
small batches' input gradients) time torch on both sides. Reports
milliseconds, GFLOP/s (the forward's FLOPs, twice that with the input gradient) and the speed-up;
where the small-row GEMM runs, also its speed-up over the path it replaces (``vs oneDNN``: oneDNN for
weights of at least 2^19 elements, torch below).

    python benches/bench_linear.py                 # the sweep above
    python benches/bench_linear.py --rows 1,8,32 --threads 2
    python benches/bench_linear.py --rows 8,9,16,20,24,32   # and the small-row GEMM's two kernels

The small-row GEMM has two kernels (csrc/ops/small_gemm.h): a table at the end times both on the same
cold weights for each row count up to 32 (``dot / broadcast`` > 1: the broadcast kernel is faster) and
says which one ``auto`` picks there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_json, print_table, time_interleaved  # noqa: E402
from spice_fast.kernels import linear as linear_mod  # noqa: E402
from spice_fast.kernels._utils import cpu_ops_available
from spice_fast.kernels.linear import linear, onednn_available  # noqa: E402
from spice_fast.kernels.swiglu import swiglu, swiglu_ref  # noqa: E402

SHAPES = {  # name: (in_features K, out_features N)
    "q/o 576x576": (576, 576),
    "k/v 576x192": (576, 192),
    "gate/up 576x1536": (576, 1536),
    "down 1536x576": (1536, 576),
    "lm head 576x49152": (576, 49152),
}


def weights(n: int, k: int, cold: bool) -> list[torch.Tensor]:
    count = max(1, (100 << 20) // (n * k * 4)) if cold else 1
    return [torch.randn(n, k) * k**-0.5 for _ in range(count)]


def kernel_path(rows: int, weight_numel: int, op: str) -> str:
    """Which kernel ``linear`` runs for the forward of this call (the module's own rules)."""
    if op == "fwd" and linear_mod.small_gemm_available() and rows <= linear_mod.SMALL_GEMM_MAX_ROWS:
        if weight_numel < linear_mod.SMALL_GEMM_MAX_WEIGHT_NUMEL:
            return "small-row"
    return "oneDNN" if weight_numel >= linear_mod.MIN_WEIGHT_NUMEL else "torch"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,8,32,512,2583", help="comma-separated row counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if not onednn_available():
        raise SystemExit("this torch build has no oneDNN: spice_fast.kernels.linear is F.linear here")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows_list = [int(r) for r in args.rows.split(",")]
    table, results = [], []
    for m in rows_list:
        for name, (k, n) in SHAPES.items():
            if n > 10000 and m > 512:
                continue  # the trainer never builds [rows, vocabulary] logits this large
            cold = m <= linear_mod.SMALL_GEMM_MAX_ROWS  # decode-sized: weights stream from memory
            ws = weights(n, k, cold)
            x, grad = torch.randn(m, k), torch.randn(m, n)
            xg = x.clone().requires_grad_()
            flops = 2 * m * n * k * len(ws)  # per product
            cases = {
                "fwd": {
                    "torch": lambda ws=ws, x=x: [F.linear(x, w) for w in ws],
                    "spice_fast": lambda ws=ws, x=x: [linear(x, w) for w in ws],
                    # oneDNN where linear would take it without the small-row GEMM (torch below 2^19)
                    "onednn": lambda ws=ws, x=x: [linear(x, w, backend="onednn") for w in ws],
                },
                "fwd+dgrad": {  # the forward and the input gradient, as a frozen-weight backward runs
                    "torch": lambda ws=ws, x=xg, g=grad: [F.linear(x, w).backward(g) for w in ws],
                    "spice_fast": lambda ws=ws, x=xg, g=grad: [linear(x, w).backward(g) for w in ws],
                },
            }
            for op, fns in cases.items():
                if op == "fwd+dgrad" and cold:
                    continue  # decode runs no backward
                if op == "fwd":
                    torch.testing.assert_close(
                        fns["spice_fast"]()[0], fns["torch"]()[0], rtol=1e-4, atol=1e-4
                    )
                t = time_interleaved(fns, warmup=2, repeat=args.repeat)
                ratio = t["torch"] / t["spice_fast"]
                op_flops = flops * (2 if op == "fwd+dgrad" else 1)
                gflops = [op_flops / t[side] / 1e9 for side in ("torch", "spice_fast")]
                path = kernel_path(m, n * k, op)
                # the small-row GEMM against the path it replaces (oneDNN, or torch for small weights)
                vs_onednn = t["onednn"] / t["spice_fast"] if path == "small-row" else "-"
                table.append([m, name, op, "cold" if cold else "hot", path, t["torch"] * 1e3,
                              t["spice_fast"] * 1e3, *gflops, ratio, vs_onednn])  # fmt: skip
                results.append({"rows": m, "shape": name, "op": op, "cold": cold, "path": path,
                                "torch_s": t["torch"], "ours_s": t["spice_fast"], "speedup": ratio,
                                "onednn_s": t.get("onednn"), "speedup_vs_onednn": vs_onednn})  # fmt: skip
    print(f"CPU linear, float32, {torch.get_num_threads()} threads; times are per call over all weights")
    print_table(["rows", "shape", "op", "weights", "path", "torch ms", "spice_fast ms", "torch GFLOP/s",
                 "spice_fast GFLOP/s", "speed-up", "vs oneDNN"], table)  # fmt: skip

    kernel_rows = []
    if linear_mod.small_gemm_available():  # the small-row GEMM's two kernels on the same calls
        kernel_names = {code: name for name, code in linear_mod.SMALL_GEMM_KERNELS.items()}
        for m in [r for r in rows_list if r <= linear_mod.SMALL_GEMM_MAX_ROWS] or [16, 32]:
            for name, (k, n) in SHAPES.items():
                ws, x = weights(n, k, cold=True), torch.randn(m, k)
                fns = {kern: lambda ws=ws, x=x, kern=kern: [linear_mod._small_gemm(x, w, None, kern)
                                                             for w in ws]
                       for kern in ("dot", "broadcast")}  # fmt: skip
                torch.testing.assert_close(fns["broadcast"]()[0], fns["dot"]()[0], rtol=1e-4, atol=1e-4)
                t = time_interleaved(fns, warmup=2, repeat=args.repeat)
                auto = kernel_names[linear_mod.cpu_ops().small_gemm_auto_kernel(m)]
                kernel_rows.append(
                    [m, name, t["dot"] * 1e3, t["broadcast"] * 1e3, t["dot"] / t["broadcast"], auto]
                )
                results.append({"rows": m, "shape": name, "op": "fwd kernels", "dot_s": t["dot"],
                                "broadcast_s": t["broadcast"], "auto": auto})  # fmt: skip
        print("\nsmall-row GEMM kernels, cold weights: dot-product tiles against the broadcast kernel")
        print_table(["rows", "shape", "dot ms", "broadcast ms", "dot / broadcast", "auto picks"], kernel_rows)

    swiglu_rows = []
    if cpu_ops_available():
        for m in rows_list:
            g = torch.randn(m, 1536, requires_grad=True)
            u = torch.randn(m, 1536, requires_grad=True)
            dh = torch.randn(m, 1536)
            fns = {"torch": lambda g=g, u=u, dh=dh: swiglu_ref(g, u).backward(dh),
                   "spice_fast": lambda g=g, u=u, dh=dh: swiglu(g, u).backward(dh)}  # fmt: skip
            t = time_interleaved(fns, warmup=2, repeat=args.repeat)
            swiglu_rows.append([m, t["torch"] * 1e3, t["spice_fast"] * 1e3, t["torch"] / t["spice_fast"]])
            results.append({"rows": m, "shape": "swiglu 1536", "op": "fwd+bwd", "torch_s": t["torch"],
                            "ours_s": t["spice_fast"], "speedup": t["torch"] / t["spice_fast"]})  # fmt: skip
        print("\nSwiGLU forward + backward, [rows, 1536] float32")
        print_table(["rows", "torch ms", "spice_fast ms", "speed-up"], swiglu_rows)
    print_json("linear", "cpu", results, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
