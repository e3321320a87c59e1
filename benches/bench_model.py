"""Forward throughput of spice_fast's model against transformers' on the same config and input.

Both models hold the same random weights (no download); the sweep is over batch x sequence length.
Prints a table (tokens/s and the ratio spice_fast / transformers), then one JSON line.

    python benches/bench_model.py                    # SmolLM2-135M shape, CPU sweep
    python benches/bench_model.py --device cuda --dtype bfloat16 --shapes 8x512,8x2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_json, print_table, time_interleaved  # noqa: E402

from spice_fast.model import CausalLM, ModelConfig  # noqa: E402

# SmolLM2-135M's architecture (the embedded default), as a transformers config.
CONFIGS = {
    "smollm2-135m": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=49152, hidden_size=576,
        intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
    ),
    "qwen3-0.6b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=1024,
        intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        max_position_embeddings=40960,
    ),
}  # fmt: skip


def build(name: str, dtype: torch.dtype, device: str):
    hf_config = transformers.AutoConfig.for_model(
        **{k: v for k, v in CONFIGS[name].items() if k != "architectures"}
    )
    hf_config.architectures = CONFIGS[name]["architectures"]
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device: on a CPU a 0.6B init alone takes many seconds
        hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa")
        hf = hf.to(dtype=dtype).eval()
        ours = CausalLM(ModelConfig.from_hf(CONFIGS[name]))
    ours.load_state_dict({k: v for k, v in hf.state_dict().items() if k in ours.state_dict()}, strict=True)
    return hf, ours.to(device=device, dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--shapes", default=None, help="comma-separated BxT, e.g. 1x128,1x512,4x512")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype
        else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    )
    default_shapes = "1x128,1x512,4x256" if args.device == "cpu" else "1x512,8x512,8x2048,32x1024"
    shapes = [tuple(int(x) for x in s.split("x")) for s in (args.shapes or default_shapes).split(",")]

    hf, ours = build(args.model, dtype, args.device)
    rows, results = [], []
    gen = torch.Generator().manual_seed(0)
    for b, t in shapes:
        ids = torch.randint(0, ours.config.vocab_size, (b, t), generator=gen).to(args.device)
        with torch.inference_mode():
            # a sanity check, not the parity test (tests/test_model.py): bf16 logits of ~10 are 1/16 apart
            tol = 5e-2 if dtype == torch.float32 else 2.5e-1
            torch.testing.assert_close(ours(ids), hf(ids).logits.float(), atol=tol, rtol=5e-2)
            times = time_interleaved(
                {"hf": lambda x=ids: hf(x).logits, "ours": lambda x=ids: ours(x)},
                device=args.device,
                repeat=args.repeat,
            )
        t_hf, t_ours = times["hf"], times["ours"]
        tok_hf, tok_ours = b * t / t_hf, b * t / t_ours
        rows.append([f"{b}x{t}", tok_hf, tok_ours, tok_ours / tok_hf])
        results.append(
            {
                "batch": b,
                "seq": t,
                "hf_tokens_per_s": tok_hf,
                "ours_tokens_per_s": tok_ours,
                "ratio": tok_ours / tok_hf,
            }
        )
    print(f"forward, {args.model}, {dtype}, {args.device}: tokens/s (median of {args.repeat})")
    print_table(["BxT", "transformers", "spice_fast", "ratio"], rows)
    print_json("model_forward", args.device, results, model=args.model, dtype=str(dtype))


if __name__ == "__main__":
    main()
