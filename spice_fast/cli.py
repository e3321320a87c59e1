"""The ``spice-fast`` command line. ``spice-fast generate --model NAME "prompt"`` prints completions."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from spice_fast.evaluate import cmd_eval
from spice_fast.plot import cmd_plot

DEFAULT_PROMPT = "Explain in two sentences why the sky is blue."


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spice-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate completions of prompts with the paged-KV engine")
    g.add_argument("prompts", nargs="*", help=f"prompt texts (default: {DEFAULT_PROMPT!r})")
    g.add_argument("--model", default="smollm2-135m", help="directory, .gguf file, hub id or alias")
    g.add_argument("-n", type=_positive_int, default=1, help="completions per prompt (prompt prefilled once)")
    g.add_argument("--max-tokens", type=_positive_int, default=128, help="new tokens per completion")
    g.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus mass kept")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--max-model-len", type=_positive_int, default=4096, help="prompt + completion limit")
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV pool size (default: by device)")
    g.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: by device)")
    g.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    g.add_argument("--no-chat-template", action="store_true", help="feed the prompt text as is")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("eval", help="accuracy on a JSONL question set (spice_fast/evaluate.py)")
    e.add_argument("--model", default="smollm2-135m", help="directory, .gguf file, hub id or alias")
    e.add_argument("--data", required=True, help="JSONL: question, answer, optional choices and type")
    e.add_argument("--out", default=None, help="predictions JSONL (default: <data>.predictions.jsonl)")
    e.add_argument("--max-tokens", type=_positive_int, default=512, help="new tokens per answer")
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    e.add_argument("--seed", type=int, default=0, help="sampling seed")
    e.add_argument("--max-model-len", type=_positive_int, default=4096, help="prompt + completion limit")
    e.add_argument("--kv-cache-gb", type=float, default=None, help="KV pool size (default: by device)")
    e.add_argument("--limit", type=_positive_int, default=None, help="evaluate the first N usable records")
    e.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: by device)")
    e.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    p = sub.add_parser("plot", help="PNG plots of a training run's metrics.jsonl (spice_fast/plot.py)")
    p.add_argument("run_dir", help="run folder holding metrics.jsonl")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    t = sub.add_parser("train", help="SPICE self-play training (spice_fast/train/)")
    t.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. spice.num_docs=8 steps=20")
    t.add_argument("--preset", default="cpu-tiny", help="cpu-tiny (default) | paper")
    t.add_argument("--config", default=None, help="YAML file over the preset")
    t.add_argument(
        "--resume", default=None, metavar="RUN_DIR", help="continue a run from its last checkpoint"
    )
    t.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    import yaml

    from spice_fast.train import Trainer, make_config, resume_config
    from spice_fast.train.config import to_dict
    from spice_fast.train.distributed import init_distributed, shutdown

    if args.resume and (args.config or args.preset != "cpu-tiny"):
        raise ValueError("--resume reads the run's own config.yaml; give only key=value overrides with it")
    if args.resume:
        config = resume_config(args.resume, args.overrides)
    else:
        config = make_config(args.preset, file=args.config, overrides=args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return 0
    ctx = init_distributed()  # a process group when launched by torchrun, else one process
    logging.getLogger("spice_fast").setLevel(logging.INFO if ctx.is_main else logging.WARNING)
    try:
        trainer = Trainer(config, resume=bool(args.resume), ctx=ctx)
        start = "resuming at step " + str(trainer.start_step + 1) if args.resume else "starting"
        ranks = f" on {ctx.world_size} ranks" if ctx.enabled else ""
        if ctx.is_main:
            print(f"spice-fast train: {start}{ranks}; run dir {config.run_dir}", file=sys.stderr)
        trainer.train()
    finally:
        shutdown(ctx)
    if ctx.is_main:
        print(f"spice-fast train: done; metrics in {config.run_dir}/metrics.jsonl", file=sys.stderr)
    return 0


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
    from spice_fast.engine import Engine, SamplingParams

    params = SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        max_tokens=args.max_tokens, stop=args.stop, seed=args.seed,
    )  # fmt: skip
    prompts = args.prompts or [DEFAULT_PROMPT]
    t0 = time.perf_counter()
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer, so text prompts cannot be encoded")
    print(
        f"loaded {args.model} ({model.config.architecture}) in {time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )
    engine = Engine(
        model, tokenizer, max_num_seqs=max(8, min(256, len(prompts) * args.n)),
        max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
    )  # fmt: skip
    encoded = [_encode(tokenizer, p, not args.no_chat_template) for p in prompts]
    t0 = time.perf_counter()
    outputs = engine.generate(encoded, params, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    for out in outputs:
        for c in out.outputs:
            sample = f", sample {c.index}" if args.n > 1 else ""
            print(f"--- prompt {out.request_id}{sample} ({c.finish_reason}): {prompts[out.request_id]!r}")
            print(c.text.strip())
    num_tokens = engine.stats.num_generated_tokens
    print(f"{num_tokens} tokens in {elapsed:.2f}s ({num_tokens / elapsed:.1f} tokens/s)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        commands = {"generate": cmd_generate, "eval": cmd_eval, "plot": cmd_plot, "train": cmd_train}
        return commands[args.command](args)
    except ValueError as e:  # bad user input (CheckpointError included): one clear line, no traceback
        print(f"spice-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
