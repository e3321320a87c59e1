"""Attention of a training pass on the CPU: the C++ tree-attention kernel against PyTorch SDPA.

The batches are what the update packs (``AttentionBatch.shared_prefix``): per document, a prompt of
``--doc-tokens`` shared by G challenger completions; per question, a prompt shared by K reasoner
answers; and plain causal sequences (``AttentionBatch.packed``). The same q, k, v go through
* ``sdpa``: the PyTorch paths of ``spice_fast.model.attention`` (``set_attention_backend("torch")``):
  one causal SDPA call per root and one masked call per other node, or one causal call per sequence;
* ``c++``: ``spice_fast.kernels.tree_attention.tree_attention``, the whole batch in one call.
Times the forward alone (no autograd, as in a prefill) and the forward plus backward (as in the
update), medians of alternating runs; GFLOP/s count the attended (query, key) pairs only (4 x heads x
head_dim per pair forward, 2.5 times that backward). SmolLM2-135M's attention shape by default.

    python benches/bench_tree_attention.py --doc-tokens 120,400,1000
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_json, print_table, time_interleaved  # noqa: E402
from spice_fast.kernels.tree_attention import tree_attention, tree_attention_supported  # noqa: E402

from spice_fast.model import AttentionBatch, set_attention_backend  # noqa: E402
from spice_fast.model.attention import packed_causal_attention  # noqa: E402


def cases(doc_tokens: list[int], g: int, k: int, completion: int) -> list[tuple[str, AttentionBatch]]:
    """(name, batch): an update's batch for two documents at each prompt length, and plain sequences."""
    out = []
    for doc in doc_tokens:
        challenger = [(doc + 40, [completion] * g) for _ in range(2)]  # prompt = document + instructions
        reasoner = [(60, [completion] * k) for _ in range(2)]
        out.append((f"update, {doc}-token docs", AttentionBatch.shared_prefix(challenger + reasoner, "cpu")))
    for lens in ([277, 424], [2000]):
        out.append((f"causal {'+'.join(map(str, lens))}", AttentionBatch.packed(lens, "cpu")))
    return out


def time_case(name: str, batch: AttentionBatch, args) -> tuple[list, dict]:
    """One batch through both paths: a table row and a JSON record."""
    n, scale = batch.positions.numel(), args.head_dim**-0.5
    q = torch.randn(n, args.heads, args.head_dim, requires_grad=True)
    k = torch.randn(n, args.kv_heads, args.head_dim, requires_grad=True)
    v = torch.randn(n, args.kv_heads, args.head_dim, requires_grad=True)
    grad = torch.randn(n, args.heads, args.head_dim)
    if not tree_attention_supported(q, k):
        raise SystemExit("the C++ kernel does not take these shapes (head_dim % 16) or is not built")
    plan = batch.tree_plan()

    def sdpa():
        set_attention_backend("torch")
        try:
            return packed_causal_attention(q, k, v, batch, scale)
        finally:
            set_attention_backend("auto")

    def kernel():
        return tree_attention(q, k, v, plan, scale)

    def no_grad(fn):
        return lambda: torch.no_grad()(fn)()

    def with_backward(fn):
        return lambda: fn().backward(grad)

    diff = (sdpa() - kernel()).abs().max().item()
    t = time_interleaved(
        {"sdpa fwd": no_grad(sdpa), "c++ fwd": no_grad(kernel), "sdpa f+b": with_backward(sdpa),
         "c++ f+b": with_backward(kernel)},
        repeat=args.repeat,
    )  # fmt: skip
    flops = 4 * plan.num_pairs * args.heads * args.head_dim
    row = [name, n]
    for mode, mult in (("fwd", 1.0), ("f+b", 3.5)):  # the backward does 2.5 times the forward's work
        base, ours = t[f"sdpa {mode}"], t[f"c++ {mode}"]
        row += [base * 1e3, ours * 1e3, base / ours, mult * flops / ours / 1e9]
    return row + [diff], {"case": name, "tokens": n, "pairs": plan.num_pairs, **t}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--doc-tokens", default="120,400,1000", help="comma-separated document lengths")
    parser.add_argument("-G", type=int, default=4, help="challenger completions per document")
    parser.add_argument("-K", type=int, default=4, help="reasoner answers per question")
    parser.add_argument("--completion", type=int, default=48, help="tokens of every completion")
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows, results = [], []
    for name, batch in cases([int(x) for x in args.doc_tokens.split(",")], args.G, args.K, args.completion):
        row, record = time_case(name, batch, args)
        rows.append(row)
        results.append(record)
    print_table(
        ["case", "tokens", "sdpa fwd ms", "c++ fwd ms", "gain", "c++ GF/s",
         "sdpa f+b ms", "c++ f+b ms", "gain", "c++ GF/s", "max |diff|"],
        rows,
    )  # fmt: skip
    print_json(
        "tree_attention", "cpu", results, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim
    )


if __name__ == "__main__":
    main()
