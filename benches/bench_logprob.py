"""Benchmark fused_linear_logprob against the naive and the TRL-style log-probabilities, in one run.

Methods (each timed forward-only and as a full step = forward + backward of sum(logp * g)):
- naive: ``log_softmax(hidden @ weight.T).gather(targets)``, materialises fp32 [N, V] logits twice.
- trl:   full [N, V] logits from the LM head, then a chunked selective log-softmax (per-chunk logsumexp
         minus the gathered logit), as TRL's ``selective_log_softmax``; autograd keeps the logits.
- spice: ``spice_fast.kernels.fused_linear_logprob`` (chunked; no [N, V] tensor).
Prints median time, peak extra memory and the ratios to naive; on a GPU also TFLOP/s counted as 2NHV
(forward) and 6NHV (step) against the bf16 peak. Then one JSON line.

    python benches/bench_logprob.py                 # CPU default: SmolLM2 sweep + small Qwen3-4B
    python benches/bench_logprob.py --quick         # one small shape per model
    python benches/bench_logprob.py --target        # the CPU target: N=4096, H=576, V=49152, fp32
    python benches/bench_logprob.py --device cuda --dtype bf16 --n 4096,8192,16384
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bf16_peak_flops, peak_memory, print_json, print_table, time_interleaved  # noqa: E402
from spice_fast.kernels import fused_linear_logprob  # noqa: E402

MODELS = {"smollm2": (576, 49152), "qwen3-4b": (2560, 151936)}  # hidden size, vocabulary
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def naive_logprob(hidden, weight, targets):
    logits = (hidden @ weight.T).float()  # [N, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def trl_logprob(hidden, weight, targets, rows: int = 512):
    logits = hidden @ weight.T  # [N, V], kept by autograd
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1).float()
    lse = torch.cat([torch.logsumexp(chunk.float(), dim=-1) for chunk in logits.split(rows)])
    return picked - lse


def spice_logprob(hidden, weight, targets):
    return fused_linear_logprob(hidden, weight, targets)


METHODS = {"naive": naive_logprob, "trl": trl_logprob, "spice": spice_logprob}


def measure(methods, hidden, weight, targets, device, warmup, repeat):
    """Per method: forward and step times (interleaved across methods) and peak extra memory."""
    grad = torch.randn(hidden.shape[0], device=device)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(hidden, weight, targets)

        return run

    def step(fn):
        def run():
            h = hidden.detach().requires_grad_()
            w = weight.detach().requires_grad_()
            (fn(h, w, targets) * grad).sum().backward()

        return run

    fwd = time_interleaved(
        {n: forward(f) for n, f in methods.items()}, device=device, warmup=warmup, repeat=repeat
    )
    stp = time_interleaved(
        {n: step(f) for n, f in methods.items()}, device=device, warmup=warmup, repeat=repeat
    )
    return {
        name: {
            "fwd_s": fwd[name],
            "step_s": stp[name],
            "fwd_mem": peak_memory(forward(fn), device),
            "step_mem": peak_memory(step(fn), device),
        }
        for name, fn in methods.items()
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--models", default="smollm2,qwen3-4b")
    p.add_argument("--n", default=None, help="comma-separated token counts to sweep")
    p.add_argument(
        "--qwen-n", default=None, help="token counts for qwen3-4b (default: --n on GPU, 256 on CPU)"
    )
    p.add_argument("--methods", default="naive,trl,spice")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repeats")
    p.add_argument("--target", action="store_true", help="the CPU target only: N=4096, SmolLM2, fp32")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    if args.target:
        args.models, args.n, dtype = "smollm2", "4096", torch.float32
    default_n = "4096,8192,16384" if on_gpu else ("512" if args.quick else "1024,4096")
    sweep = [int(x) for x in (args.n or default_n).split(",")]
    qwen_sweep = [
        int(x) for x in (args.qwen_n or (args.n if on_gpu else ("64" if args.quick else "256"))).split(",")
    ]
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    repeat = args.repeat if args.repeat is not None else (10 if on_gpu else (2 if args.quick else 3))
    peak = bf16_peak_flops(device) if on_gpu else None

    headers = ["model", "N", "method", "fwd ms", "step ms", "bwd ms", "fwd MB", "step MB"]
    headers += ["fwd t/naive", "step t/naive", "fwd mem/naive", "step mem/naive"]
    if on_gpu:
        headers += ["fwd TF/s", "step TF/s", "step %peak"]
    rows, results = [], []
    for model in args.models.split(","):
        hidden_size, vocab = MODELS[model]
        for num_tokens in qwen_sweep if model == "qwen3-4b" else sweep:
            g = torch.Generator(device=device).manual_seed(0)
            hidden = torch.randn(num_tokens, hidden_size, device=device, generator=g).to(dtype)
            weight = (torch.randn(vocab, hidden_size, device=device, generator=g) * hidden_size**-0.5).to(
                dtype
            )
            targets = torch.randint(0, vocab, (num_tokens,), device=device, generator=g)
            methods = {name: METHODS[name] for name in args.methods.split(",")}
            measured = measure(methods, hidden, weight, targets, device, warmup, repeat)
            base = measured.get("naive")
            for name, m in measured.items():
                flops_fwd, flops_step = (
                    2 * num_tokens * hidden_size * vocab,
                    6 * num_tokens * hidden_size * vocab,
                )
                row = [
                    model,
                    num_tokens,
                    name,
                    1e3 * m["fwd_s"],
                    1e3 * m["step_s"],
                    1e3 * (m["step_s"] - m["fwd_s"]),
                ]
                row += [m["fwd_mem"] / 2**20, m["step_mem"] / 2**20]
                ratios = {}
                if base:
                    ratios = {
                        "fwd_time_ratio": m["fwd_s"] / base["fwd_s"],
                        "step_time_ratio": m["step_s"] / base["step_s"],
                        "fwd_mem_ratio": m["fwd_mem"] / max(base["fwd_mem"], 1),
                        "step_mem_ratio": m["step_mem"] / max(base["step_mem"], 1),
                    }
                row += [
                    ratios.get(k, "-")
                    for k in ("fwd_time_ratio", "step_time_ratio", "fwd_mem_ratio", "step_mem_ratio")
                ]
                extra = {}
                if on_gpu:
                    extra = {
                        "fwd_tflops": flops_fwd / m["fwd_s"] / 1e12,
                        "step_tflops": flops_step / m["step_s"] / 1e12,
                    }
                    extra["step_frac_peak"] = flops_step / m["step_s"] / peak if peak else None
                    row += [
                        extra["fwd_tflops"],
                        extra["step_tflops"],
                        100 * extra["step_frac_peak"] if peak else "-",
                    ]
                rows.append(row)
                results.append(
                    {
                        "model": model,
                        "N": num_tokens,
                        "H": hidden_size,
                        "V": vocab,
                        "method": name,
                        **m,
                        **ratios,
                        **extra,
                    }
                )
            del hidden, weight, targets
    print(f"fused_linear_logprob, {device_label(device)}, dtype {str(dtype).removeprefix('torch.')}")
    print_table(headers, rows)
    print_json("logprob", device, results, dtype=str(dtype), warmup=warmup, repeat=repeat)


def device_label(device: torch.device) -> str:
    return (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )


if __name__ == "__main__":
    main()
