"""The ``spice-fast`` command line. ``spice-fast generate --model NAME "prompt"`` prints completions."""

from __future__ import annotations

import argparse
import logging
import sys
import time

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spice-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate completions of prompts")
    g.add_argument("prompts", nargs="*", help=f"prompt texts (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--model", default="smollm2-135m", help="directory, .gguf file, hub id or alias")
    g.add_argument("-n", type=_positive_int, default=1, help="completions per prompt")
    g.add_argument("--max-tokens", type=_positive_int, default=128, help="new tokens per completion")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: by device)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as is")
    return parser


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer.encode(text)


def cmd_generate(args: argparse.Namespace) -> int:
    from spice_fast import load
    from spice_fast.generate import generate

    if args.temperature < 0:
        raise SystemExit(f"--temperature must be >= 0, got {args.temperature}")
    prompts = args.prompts or [DEFAULT_PROMPT]
    t0 = time.perf_counter()
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        raise SystemExit(f"model {args.model!r} has no tokenizer, so text prompts cannot be encoded")
    print(
        f"loaded {args.model} ({model.config.architecture}) in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    encoded = [_encode(tokenizer, p, not args.no_chat_template) for p in prompts for _ in range(args.n)]
    stop = list(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stop:
        stop.append(tokenizer.eos_token_id)
    t0 = time.perf_counter()
    outputs = generate(
        model, encoded, max_new_tokens=args.max_tokens, temperature=args.temperature,
        stop_token_ids=stop, seed=args.seed,
    )  # fmt: skip
    elapsed = time.perf_counter() - t0
    for i, out in enumerate(outputs):
        prompt = prompts[i // args.n]
        header = f"--- prompt {i // args.n}" + (f", sample {i % args.n}" if args.n > 1 else "")
        print(f"{header}: {prompt!r}")
        print(tokenizer.decode(out, skip_special_tokens=True).strip())
    num_tokens = sum(len(o) for o in outputs)
    print(f"{num_tokens} tokens in {elapsed:.2f}s ({num_tokens / elapsed:.1f} tokens/s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate}[args.command](args)
    except ValueError as e:  # bad user input (CheckpointError included): one clear line, no traceback
        print(f"spice-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
