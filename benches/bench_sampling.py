"""Token sampling on the CPU: the C++ kernel (``sample_tokens(..., backend="cpp")``) against the torch
path (``sample_tokens_ref``), in one run, on logits of the default model.

The logits are real: SmolLM2-135M's next-token logits at every position of a pydoc topic (the
embedded corpus), so nuclei have the widths a decode step meets (``--random`` takes Gaussian logits
of the same vocabulary instead, no model needed). Each line draws one token for each of ``rows``
rows (the sequences of a decode step) with the given temperature, top-p and top-k, and reports
milliseconds per call, the speed-up and how many of the rows drew the same token on both paths.

    python benches/bench_sampling.py                      # rows 1, 8, 32, 64; the trainer's settings and more
    python benches/bench_sampling.py --rows 32 --random
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_json, print_table, time_interleaved  # noqa: E402
from spice_fast.kernels._utils import cpu_ops_available  # noqa: E402

from spice_fast.engine.sampling import row_key, sample_tokens  # noqa: E402

SETTINGS = [  # (temperature, top_p, top_k); the first is the cpu-tiny preset's
    (0.7, 0.95, 0),
    (1.0, 1.0, 0),
    (1.0, 0.9, 0),
    (1.0, 1.0, 50),
    (0.0, 1.0, 0),
]


def model_logits(num: int) -> torch.Tensor:  # [num, V]
    import spice_fast
    from spice_fast.spice.corpus import Corpus, CorpusConfig

    model, tokenizer = spice_fast.load("smollm2-135m", device="cpu")
    ids: list[int] = []
    for doc in Corpus(CorpusConfig(max_doc_tokens=num), tokenizer=tokenizer):
        ids += tokenizer.encode(doc.text)
        if len(ids) >= num:
            break
    with torch.inference_mode():
        return model(torch.tensor([ids[:num]]))[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", default="1,8,32,64")
    parser.add_argument("--random", action="store_true", help="Gaussian logits instead of the model's")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    if not cpu_ops_available():
        raise SystemExit("spice_fast._cpu_ops is not built: nothing to compare")
    rows_list = [int(r) for r in args.rows.split(",")]
    need = max(rows_list)
    if args.random:
        gen = torch.Generator().manual_seed(0)
        logits = torch.randn(need, 49152, generator=gen) * 3 + torch.randn(49152, generator=gen) * 4
    else:
        logits = model_logits(max(need, 64))
    source = "random" if args.random else "SmolLM2-135M on a pydoc topic"
    print(f"token sampling, {logits.shape[1]} tokens, logits: {source}, {torch.get_num_threads()} threads")
    table, results = [], []
    for rows in rows_list:
        x = logits[:rows].contiguous()
        keys = [row_key(3, r, 0) for r in range(rows)]
        for t, p, k in SETTINGS:
            call = (x, [t] * rows, [p] * rows, [k] * rows, keys)
            times = time_interleaved(
                {b: (lambda b=b, call=call: sample_tokens(*call, backend=b)) for b in ("torch", "cpp")},
                repeat=args.repeat,
            )
            tokens = {b: sample_tokens(*call, backend=b)[0] for b in ("torch", "cpp")}
            same = int((tokens["torch"] == tokens["cpp"]).sum())
            gain = times["torch"] / times["cpp"]
            table.append([rows, t, p, k, times["torch"] * 1e3, times["cpp"] * 1e3, gain, f"{same}/{rows}"])
            results.append({
                "rows": rows, "temperature": t, "top_p": p, "top_k": k, "torch_ms": times["torch"] * 1e3,
                "cpp_ms": times["cpp"] * 1e3, "gain": gain, "same_tokens": same,
            })  # fmt: skip
    print_table(["rows", "T", "top_p", "top_k", "torch ms", "cpp ms", "gain", "same tokens"], table)
    print_json("sampling", "cpu", results, logits=source, vocab=logits.shape[1])


if __name__ == "__main__":
    main()
