"""Rollout throughput: spice_fast's engine against transformers ``generate`` on the same workload.

Same model and weights, prompts and sampling parameters, in the same run: 8 chat prompts x n=8
samples, temperature 1.0 (no top-k / top-p), up to 128 new tokens, stop at EOS. Prints generated
tokens/s of both, the ratio, and the KV memory each used, then one JSON line.

    python benches/bench_sampler.py                       # embedded default model, float32, CPU
    python benches/bench_sampler.py --random qwen3-0.6b --device cuda --dtype bfloat16   # no download

With ``--random NAME`` the model is a random-weight one of that architecture (bench_model's CONFIGS)
and the prompts are random token ids of chat-prompt length; without EOS, every sample runs to
``--max-tokens`` on both sides.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_json, print_table  # noqa: E402

import spice_fast  # noqa: E402
from spice_fast.engine import Engine, SamplingParams  # noqa: E402
from spice_fast.model import CausalLM, ModelConfig, PagedKVCache  # noqa: E402

QUESTIONS = [
    "What is the capital of Australia?",
    "Explain photosynthesis in one paragraph.",
    "Write a short poem about the sea.",
    "What is 17 times 23? Show your work.",
    "Give three tips for writing clean code.",
    "Why do leaves change color in autumn?",
    "Summarize the plot of Romeo and Juliet.",
    "How does a binary search work?",
]


def hf_twin(model) -> transformers.PreTrainedModel:
    """A transformers model holding copies of the same weights."""
    config = transformers.AutoConfig.for_model(**model.config.to_hf())
    with model.device:  # no random init of a second model on the CPU first
        hf = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation="sdpa", dtype=model.dtype
        )
    missing = hf.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert set(missing) <= {"lm_head.weight"}, missing  # tied head
    return hf.to(model.device).eval()


def run_hf(hf, tokenizer, prompts, n, max_tokens, temperature, stop_ids, device):
    if tokenizer is None:  # equal-length token-id prompts
        ids = torch.tensor(prompts, device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        pad_id = 0
    else:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        pad_id = tokenizer.pad_token_id
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(
            **batch, do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_tokens,
            num_return_sequences=n, eos_token_id=stop_ids or None, pad_token_id=pad_id,
        )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1] :]
    num_tokens = 0
    for row in new.tolist():  # count up to and including the first stop token, as the engine does
        ends = [i for i, t in enumerate(row) if t in stop_ids]
        num_tokens += ends[0] + 1 if ends else len(row)
    c = hf.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_bytes = 2 * c.num_hidden_layers * out.shape[0] * out.shape[1] * c.num_key_value_heads * head_dim
    return num_tokens, elapsed, kv_bytes * hf.dtype.itemsize


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--random", default=None, help="random weights of a bench_model config instead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("-n", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    device = torch.device(args.device)

    if args.random:
        from bench_model import CONFIGS

        with device:
            model = CausalLM(ModelConfig.from_hf(CONFIGS[args.random]))
        model = model.to(dtype=getattr(torch, args.dtype)).init_weights(seed=0).eval()
        tokenizer = None
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(10, 1000, (40,), generator=gen).tolist() for _ in range(args.num_prompts)]
        args.model = f"random {args.random}"
    else:
        model, tokenizer = spice_fast.load(args.model, dtype=args.dtype, device=device)
        chats = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.num_prompts)]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
            )
            for q in chats
        ]
    engine = Engine(model, tokenizer, max_num_seqs=args.num_prompts * args.n, max_model_len=1024)
    stop_ids = engine.stop_token_ids
    params = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, seed=0)

    engine.generate(prompts[:1], SamplingParams(max_tokens=4))  # warm-up (kernels, allocator)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    if device.type == "cuda":
        torch.cuda.synchronize()
    ours_time = time.perf_counter() - start
    ours_tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    ours_kv = engine.stats.peak_blocks_used * PagedKVCache.bytes_per_block(
        model.config, engine.block_size, model.dtype
    )

    hf = hf_twin(model)
    del engine
    hf_tokens, hf_time, hf_kv = run_hf(
        hf, tokenizer, prompts, args.n, args.max_tokens, args.temperature, stop_ids, device
    )

    ours_tps, hf_tps = ours_tokens / ours_time, hf_tokens / hf_time
    print(f"rollout, {args.model}, {args.dtype}, {args.device}: {args.num_prompts} prompts x n={args.n}, "
          f"T={args.temperature}, <= {args.max_tokens} new tokens, stop at EOS")  # fmt: skip
    print_table(
        ["engine", "tokens", "seconds", "tokens/s", "KV MiB", "ratio"],
        [
            ["transformers generate", hf_tokens, hf_time, hf_tps, hf_kv / 2**20, 1.0],
            ["spice_fast Engine", ours_tokens, ours_time, ours_tps, ours_kv / 2**20, ours_tps / hf_tps],
        ],
    )
    print_json(
        "sampler", device,
        [{"hf_tokens_per_s": hf_tps, "ours_tokens_per_s": ours_tps, "ratio": ours_tps / hf_tps,
          "hf_kv_bytes": hf_kv, "ours_kv_bytes": ours_kv}],
        model=args.model, dtype=args.dtype, num_prompts=args.num_prompts, n=args.n,
        max_tokens=args.max_tokens,
    )  # fmt: skip


if __name__ == "__main__":
    main()
