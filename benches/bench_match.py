"""Benchmark of the C++ answer matcher against Hugging Face math-verify on the same pairs, same run.

Pairs come from tests/data/match_pairs.py (numbers in many spellings, fractions, expressions,
radicals, sets, intervals, tuples, MCQ, a third of them full responses with a box, half wrong).
Reports pairs/s of ``verify_batch`` for a sweep of thread counts, math-verify's single-thread pairs/s
(on a subset: it is slow), the ratios, and p50/p99 latency per pair of single native calls.
Target (issue 5): at least 200x math-verify single-thread throughput, p99 under 1 ms.

    python benches/bench_match.py [--num-pairs 4000] [--mv-pairs 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "data"))

from common import print_json, print_table, time_fn  # noqa: E402
from match_pairs import make_pairs  # noqa: E402

from spice_fast import _matcher  # noqa: E402
from spice_fast.match import verify_batch  # noqa: E402


def math_verify_pairs_per_s(pairs: list[tuple[str, str]]) -> float | None:
    try:
        from math_verify import parse, verify
    except ImportError:
        print("math-verify is not installed: no baseline (pip install 'math-verify[antlr4_13_2]')")
        return None

    def judge(pred: str, gold: str) -> bool:
        pred_text = pred if ("\\boxed" in pred or "answer is" in pred) else f"${pred}$"
        return verify(parse(f"${gold}$"), parse(pred_text))

    for pred, gold in pairs[:5]:  # warm-up: imports, grammar caches
        judge(pred, gold)
    start = time.perf_counter()
    for pred, gold in pairs:
        judge(pred, gold)
    return len(pairs) / (time.perf_counter() - start)


def latencies_us(preds: list[bytes], golds: list[bytes]) -> list[float]:
    out = []
    for p, g in zip(preds, golds, strict=True):
        start = time.perf_counter()
        _matcher.verify(p, g, 0)
        out.append((time.perf_counter() - start) * 1e6)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-pairs", type=int, default=4000)
    parser.add_argument("--mv-pairs", type=int, default=300, help="pairs timed with math-verify")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    cases = make_pairs(args.num_pairs, args.seed)
    preds = [p for p, _, _, _ in cases]
    golds = [g for _, g, _, _ in cases]
    num_cores = os.cpu_count() or 1

    mv_rate = math_verify_pairs_per_s(list(zip(preds, golds, strict=True))[: args.mv_pairs])

    rows, results = [], []
    thread_counts = sorted({1, 2, num_cores} if num_cores > 1 else {1})
    for threads in thread_counts:
        seconds = time_fn(lambda t=threads: verify_batch(preds, golds, num_threads=t), warmup=1, repeat=5)
        rate = len(preds) / seconds
        ratio = rate / mv_rate if mv_rate else float("nan")
        rows.append([f"verify_batch, {threads} thread(s)", rate, ratio])
        results.append(
            {"impl": "spice_fast", "threads": threads, "pairs_per_s": rate, "vs_math_verify": ratio}
        )
    if mv_rate:
        rows.append(["math-verify, 1 thread", mv_rate, 1.0])
        results.append({"impl": "math-verify", "threads": 1, "pairs_per_s": mv_rate, "pairs": args.mv_pairs})

    enc_p = [p.encode() for p in preds]
    enc_g = [g.encode() for g in golds]
    latencies_us(enc_p[:200], enc_g[:200])  # warm-up
    lat = sorted(latencies_us(enc_p, enc_g))
    p50 = statistics.median(lat)
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    worst = lat[-1]

    print(f"{len(preds)} pairs, {num_cores} cores")
    print_table(["implementation", "pairs/s", "x math-verify"], rows)
    print(f"latency per pair (native verify calls): p50 {p50:.1f} us, p99 {p99:.1f} us, max {worst:.1f} us")
    one = results[0]["vs_math_verify"]
    print(f"target: >= 200x math-verify single-thread ({one:.0f}x at 1 thread), p99 < 1000 us ({p99:.1f} us)")
    print_json(
        "match",
        "cpu",
        results,
        num_pairs=len(preds),
        mv_pairs=args.mv_pairs,
        latency_us={"p50": p50, "p99": p99, "max": worst},
    )


if __name__ == "__main__":
    main()
