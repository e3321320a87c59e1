"""Benchmark one GRPO loss step (forward + backward from hidden states) against the usual ways, in one run.

Methods, all computing the Dr. GRPO clipped loss and its gradients w.r.t. hidden and the LM head:
- naive:   ``log_softmax(hidden @ weight.T).gather`` then ``policy_loss_ref`` (fp32 [N, V] logits, autograd).
- trl:     full logits, TRL-style chunked selective log-softmax, then ``policy_loss_ref``.
- unfused: ``policy_loss(fused_linear_logprob(...))``: no [N, V] tensor, logits recomputed in backward (8NHV).
- fused:   ``fused_grpo_loss``: one vocabulary pass plus the two gradient GEMMs (6NHV).
- fused2:  the same in two equal row chunks (not in the default list; a GPU chunking candidate).
- liger:   Liger-Kernel's ``LigerFusedLinearGRPOLoss`` (dr_grpo) at its defaults (one sequence per chunk),
           only when liger_kernel is installed; liger8: the same with 8 sequences (4,096 rows) per chunk.
Prints median step time, peak extra memory, ratios to naive and, on a GPU, TFLOP/s counted as 6NHV
against the bf16 peak. Then one JSON line.

    python benches/bench_grpo_loss.py --quick
    python benches/bench_grpo_loss.py --target        # CPU target: N=4096, H=576, V=49152, fp32
    python benches/bench_grpo_loss.py --device cuda --models big --n 8192   # GPU target (H=4096)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_logprob import naive_logprob, trl_logprob  # noqa: E402
from common import (  # noqa: E402
    bf16_peak_flops,
    measured_gemm_flops,
    peak_memory,
    print_json,
    print_table,
    time_interleaved,
)
from spice_fast.kernels import fused_grpo_loss, fused_linear_logprob, policy_loss, policy_loss_ref  # noqa: E402

MODELS = {"smollm2": (576, 49152), "qwen3-4b": (2560, 151936), "big": (4096, 151936)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SEQ_LEN = 512  # tokens per sequence; N = num_seqs * SEQ_LEN (or one sequence when N < SEQ_LEN)


def make_batch(num_tokens, hidden_size, vocab, dtype, device):
    seq_len = min(SEQ_LEN, num_tokens)
    num_seqs = num_tokens // seq_len
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(num_seqs, seq_len, hidden_size, device=device, generator=g).to(dtype)
    weight = (torch.randn(vocab, hidden_size, device=device, generator=g) * hidden_size**-0.5).to(dtype)
    targets = torch.randint(0, vocab, (num_seqs, seq_len), device=device, generator=g)
    old = -torch.rand(num_seqs, seq_len, device=device, generator=g) * 12  # near log(1/V)
    adv = torch.randn(num_seqs, device=device, generator=g)
    mask = torch.rand(num_seqs, seq_len, device=device, generator=g) > 0.1
    return hidden, weight, targets, old, adv, mask


def with_logprob(logprob_fn):
    def loss(h, w, targets, old, adv, mask):
        lp = logprob_fn(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1)).view(targets.shape)
        return policy_loss_ref(lp, old, adv, mask)[0]

    return loss


def unfused(h, w, targets, old, adv, mask):
    lp = fused_linear_logprob(h.reshape(-1, h.shape[-1]), w, targets.reshape(-1)).view(targets.shape)
    return policy_loss(lp, old, adv, mask)[0]


def fused(h, w, targets, old, adv, mask):
    return fused_grpo_loss(h, w, targets, old, adv, mask)[0]


def fused_half(h, w, targets, old, adv, mask):
    """The same with the rows in two equal chunks (aligned to 256): a candidate GPU default to time
    against the default's chunks (about 1 GiB of bf16 logits each, the last one short)."""
    num_rows = targets.numel()
    chunk = max(256, -(-num_rows // 2 // 256) * 256)
    return fused_grpo_loss(h, w, targets, old, adv, mask, chunk_size=chunk)[0]


def liger_method(chunk_size: int = 1):
    """Liger's fused linear GRPO loss with the Dr. GRPO aggregation, or None when not installed.
    ``chunk_size`` is sequences per chunk: Liger's default is 1 (here 512 rows per vocabulary GEMM)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError:
        return None

    def loss(h, w, targets, old, adv, mask):
        module = LigerFusedLinearGRPOLoss(
            beta=0.0,
            use_ref_model=False,
            loss_type="dr_grpo",
            max_completion_length=targets.shape[1],
            chunk_size=chunk_size,
        )
        out = module(h, w, targets, mask.to(h.dtype), adv, old_per_token_logps=old)
        return out[0] if isinstance(out, tuple) else out

    return loss


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--models", default=None, help="comma-separated, from " + ",".join(MODELS))
    p.add_argument("--n", default=None, help="comma-separated token counts to sweep")
    p.add_argument("--methods", default="naive,trl,unfused,fused,liger,liger8")
    p.add_argument("--quick", action="store_true", help="small shapes, fewer repeats")
    p.add_argument("--target", action="store_true", help="the CPU target only: N=4096, SmolLM2, fp32")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    models = args.models or ("smollm2,qwen3-4b,big" if on_gpu else "smollm2")
    default_n = "4096,8192" if on_gpu else ("512" if args.quick else "1024,4096")
    if args.target:
        models, args.n, dtype = "smollm2", "4096", torch.float32
    sweep = [int(x) for x in (args.n or default_n).split(",")]
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    repeat = args.repeat if args.repeat is not None else (10 if on_gpu else (2 if args.quick else 3))
    peak = bf16_peak_flops(device) if on_gpu else None
    gemm = measured_gemm_flops(device, dtype) if on_gpu else None  # what cuBLAS reaches here, now

    available = {"naive": with_logprob(naive_logprob), "trl": with_logprob(trl_logprob)}
    available |= {"unfused": unfused, "fused": fused, "fused2": fused_half}
    available |= {"liger": liger_method(), "liger8": liger_method(8)}
    methods = {}
    for name in args.methods.split(","):
        if available.get(name) is None:
            print(f"{name}: not available here (liger_kernel not installed), skipped")
            continue
        methods[name] = available[name]

    headers = ["model", "N", "method", "step ms", "step MB", "t/naive", "mem/naive"]
    headers += ["TF/s", "%peak", "%GEMM"] if on_gpu else []
    rows, results = [], []
    for model in models.split(","):
        hidden_size, vocab = MODELS[model]
        for num_tokens in sweep:
            batch = make_batch(num_tokens, hidden_size, vocab, dtype, device)

            def step(fn, batch=batch):
                def run():
                    hidden, weight, *rest = batch
                    h = hidden.detach().requires_grad_()
                    w = weight.detach().requires_grad_()
                    fn(h, w, *rest).backward()

                return run

            times = time_interleaved(
                {n: step(f) for n, f in methods.items()}, device=device, warmup=warmup, repeat=repeat
            )
            mems = {n: peak_memory(step(f), device) for n, f in methods.items()}
            flops = 6 * num_tokens * hidden_size * vocab
            for name in methods:
                rec = {"model": model, "N": num_tokens, "H": hidden_size, "V": vocab, "method": name}
                rec |= {"step_s": times[name], "step_mem": mems[name]}
                if "naive" in times:
                    rec["time_ratio"] = times[name] / times["naive"]
                    rec["mem_ratio"] = mems[name] / max(mems["naive"], 1)
                row = [model, num_tokens, name, 1e3 * times[name], mems[name] / 2**20]
                row += [rec.get("time_ratio", "-"), rec.get("mem_ratio", "-")]
                if on_gpu:
                    rec["tflops"] = flops / times[name] / 1e12
                    rec["frac_peak"] = flops / times[name] / peak if peak else None
                    rec["frac_gemm"] = flops / times[name] / gemm
                    row += [rec["tflops"], 100 * rec["frac_peak"] if peak else "-", 100 * rec["frac_gemm"]]
                rows.append(row)
                results.append(rec)
            del batch
    print(f"GRPO loss step (forward + backward), {device}, dtype {str(dtype).removeprefix('torch.')}")
    if on_gpu:
        print(
            f"TF/s counted as 6NHV; %peak against the datasheet's dense bf16 peak ({peak / 1e12:.0f} TF/s)"
            if peak
            else "TF/s counted as 6NHV; datasheet peak unknown",
            f"; %GEMM against an 8192^3 matmul measured in this run ({gemm / 1e12:.0f} TF/s)",
            sep="",
        )
    print_table(headers, rows)
    print_json("grpo_loss", device, results, dtype=str(dtype), warmup=warmup, repeat=repeat, gemm_flops=gemm)


if __name__ == "__main__":
    main()
