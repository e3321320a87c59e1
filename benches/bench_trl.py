"""Benchmark one TRL GRPO update with and without spice_fast's kernels, in one run.

The update is TRL's ``compute_loss`` + ``backward`` on one fixed generated batch (what
``GRPOTrainer.training_step`` does after generation; no optimizer step), with three trainers on copies of
the same random model:
- naive: ``GRPOTrainer`` whose log-probabilities come from full ``[B, K, V]`` logits and ``log_softmax``
         (as TRL did before its fused head; the memory reference).
- trl:   ``trl.GRPOTrainer`` as installed (trl >= 1.16 already has a chunked fused LM head of its own).
- spice: ``spice_fast.integrations.trl.SpiceGRPOTrainer`` (``spice_fast.kernels.fused_linear_logprob`` for
         the log-probabilities, ``spice_fast.kernels.policy_loss`` for the loss).
The model is a randomly initialised Llama with SmolLM2-135M's shape (H 576, V 49152, tied embeddings)
and fewer layers; the batch is left-padded prompts and right-padded completions of random lengths,
swept over the completion length. Prints median time, peak extra memory, the ratios to TRL and each
loss's difference from TRL's (they compute the same loss), then one JSON line.

    python benches/bench_trl.py                       # CPU: completions of 128 and 512 tokens
    python benches/bench_trl.py --quick               # one small shape
    python benches/bench_trl.py --device cuda --completion-lens 512,2048 --layers 30
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import PeakMemory, print_json, print_table, time_interleaved  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def smollm2_shape(num_layers: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=num_layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def make_trainers(model, device, names: list[str], temperature: float) -> dict:
    from datasets import Dataset
    from tiny_models import byte_tokenizer
    from trl import GRPOConfig, GRPOTrainer

    from spice_fast.integrations.trl import SpiceGRPOTrainer

    class NaiveGRPOTrainer(GRPOTrainer):
        """Full logits of the completion positions, log_softmax, gather (TRL before its fused head)."""

        def _get_per_token_logps_and_entropies(
            self,
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            batch_size=None,
            compute_entropy=False,
            **_,
        ):
            with self.accelerator.autocast():
                logits = model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    logits_to_keep=logits_to_keep + 1,
                    use_cache=False,
                ).logits  # [B, K + 1, V]
            logits = logits[:, :-1].float() / self.temperature  # the last position predicts nothing kept
            logp_all = torch.log_softmax(logits, dim=-1)
            logps = logp_all.gather(-1, input_ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1)
            entropies = -(logp_all.exp() * logp_all).sum(-1) if compute_entropy else None
            keep = attention_mask[:, -logits_to_keep:].bool()
            return (
                logps.masked_fill(~keep, 0.0),
                None if entropies is None else entropies.masked_fill(~keep, 0.0),
                None,
            )

    classes = {"naive": NaiveGRPOTrainer, "trl": GRPOTrainer, "spice": SpiceGRPOTrainer}
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = "<unk>"
    dataset = Dataset.from_dict({"prompt": ["p"] * 8})
    out = {}
    for name in names:
        args = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix="bench_trl_"),
            report_to=[],
            use_cpu=device.type == "cpu",
            bf16=False,
            temperature=temperature,
            gradient_checkpointing=False,
            save_strategy="no",
            disable_tqdm=True,
        )
        trainer = classes[name](
            model=copy.deepcopy(model),
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.model.to(device).train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), read by the loss
        out[name] = trainer
    return out


def make_batch(batch: int, prompt_len: int, completion_len: int, vocab: int, pad: int, device, seed: int = 0):
    """The keys ``_compute_loss`` reads, as ``_generate_and_score_completions`` leaves them."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (batch, prompt_len), generator=g)
    completion_ids = torch.randint(3, vocab, (batch, completion_len), generator=g)
    prompt_pad = torch.randint(0, prompt_len // 2, (batch,), generator=g)
    prompt_pad[0] = 0
    lengths = torch.randint(completion_len // 4, completion_len + 1, (batch,), generator=g)
    lengths[0] = completion_len
    prompt_mask = (torch.arange(prompt_len) >= prompt_pad[:, None]).long()
    completion_mask = (torch.arange(completion_len) < lengths[:, None]).long()
    inputs = {
        "prompt_ids": prompt_ids.masked_fill(prompt_mask == 0, pad),
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids.masked_fill(completion_mask == 0, pad),
        "completion_mask": completion_mask,
        "advantages": torch.randn(batch, generator=g),
        "num_items_in_batch": completion_mask.sum(),
    }
    return {k: v.to(device) for k, v in inputs.items()}


def update(trainer, inputs):
    """One GRPO update without the optimizer: TRL's compute_loss, then backward."""

    def run():
        trainer.model.zero_grad(set_to_none=True)
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        return loss.detach()

    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (SmolLM2-135M has 30)")
    p.add_argument("--batch", type=int, default=8, help="sequences per update (one group of 8 samples)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--completion-lens", default=None, help="comma-separated completion lengths to sweep")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--methods", default="naive,trl,spice")
    p.add_argument("--quick", action="store_true", help="one small shape, fewer repeats")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    dtype = DTYPES[args.dtype or ("bf16" if on_gpu else "fp32")]
    default_lens = "512,2048" if on_gpu else ("64" if args.quick else "128,512")
    sweep = [int(x) for x in (args.completion_lens or default_lens).split(",")]
    if args.quick:
        args.batch = min(args.batch, 4)
    warmup = args.warmup if args.warmup is not None else (3 if on_gpu else 1)
    repeat = args.repeat if args.repeat is not None else (10 if on_gpu else (2 if args.quick else 3))
    names = args.methods.split(",")
    if "trl" not in names:
        raise ValueError(f"--methods must include 'trl' (the baseline), got {args.methods!r}")

    torch.manual_seed(0)
    config = smollm2_shape(args.layers)
    model = transformers.LlamaForCausalLM(config).to(dtype)
    trainers = make_trainers(model, device, names, args.temperature)
    del model

    headers = ["K", "tokens", "method", "step ms", "peak MB", "t/trl", "mem/trl", "loss - trl"]
    rows, results = [], []
    for completion_len in sweep:
        inputs = make_batch(
            args.batch, args.prompt_len, completion_len, config.vocab_size, config.pad_token_id, device
        )
        steps = {name: update(t, inputs) for name, t in trainers.items()}
        losses = {name: float(step()) for name, step in steps.items()}
        times = time_interleaved(steps, device=device, warmup=warmup, repeat=repeat)
        memory = {}
        for name, step in steps.items():
            with PeakMemory(device) as peak:
                step()
            memory[name] = peak.bytes
        num_tokens = args.batch * (args.prompt_len + completion_len)
        for name in names:
            mem = memory[name]
            rows.append(
                [
                    completion_len,
                    num_tokens,
                    name,
                    1e3 * times[name],
                    float("nan") if mem is None else mem / 2**20,
                    times[name] / times["trl"],
                    float("nan") if mem is None or not memory["trl"] else mem / memory["trl"],
                    losses[name] - losses["trl"],
                ]
            )
            results.append(
                {
                    "completion_len": completion_len,
                    "completion_tokens": int(inputs["completion_mask"].sum()),
                    "tokens": num_tokens,
                    "method": name,
                    "step_s": times[name],
                    "peak_bytes": mem,
                    "loss": losses[name],
                }
            )
    print_table(headers, rows)
    from importlib.metadata import version

    print_json(
        "trl_grpo_update",
        device,
        results,
        trl=version("trl"),
        dtype=str(dtype).removeprefix("torch."),
        model={"hidden": config.hidden_size, "vocab": config.vocab_size, "layers": args.layers, "tied": True},
        batch=args.batch,
        prompt_len=args.prompt_len,
        temperature=args.temperature,
        loss_type=trainers["trl"].loss_type,
        threads=torch.get_num_threads(),
        spice_kernels=os.environ.get("SPICE_FAST_KERNELS", "auto"),
    )


if __name__ == "__main__":
    main()
