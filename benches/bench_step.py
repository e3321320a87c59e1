"""One SPICE iteration: spice_fast's trainer path against the same work done the common way, in one run.

Both sides start from the same weights (the embedded default model and a transformers copy of it),
read the same B corpus documents (pydoc, at most ``--max-doc-tokens`` tokens each, counted by the
tokenizer) with the same challenger prompts (answer types drawn per sample as ``spice_rollout`` does,
the reply started with ``prompts.CHALLENGER_PREFIX`` when ``spice.prefill_question_tag``; the parser
reads prefix + completion) and the sampler settings of the ``cpu-tiny`` preset (temperature, top-p),
and both do one iteration of ../shared/SPICE.md: B x G challenger samples, K reasoner samples per question,
matching, rewards, advantages, one Dr. GRPO policy update with AdamW.

- spice_fast: ``Engine`` over the model's own weights (paged KV, a request's prompt prefilled once
  for its n samples), ``spice_fast.match`` through ``rewards.reasoner_rewards``, ``policy_update``
  (packed micro-batches without padding, fused GRPO loss, AdamW). Old logprobs are the sampler's
  (the trainer's default, free) or recomputed with ``--old-logprobs recompute``. As in the trainer
  (``rollout.new_record``), the engine records the layer products of the sequences to be trained and
  the update's forward takes them instead of multiplying again (spice_fast.model.replay; on a
  float32 CPU with sampler logprobs; the summary line counts the replayed rows; ``--no-replay`` turns
  it off).
- common (what TRL's GRPOTrainer does on a CPU): transformers ``generate(do_sample=True,
  num_return_sequences=...)`` on left-padded batches, each challenger prompt repeated per sample;
  math-verify ``parse``/``verify`` as in TRL's accuracy reward; old logprobs as TRL takes them: with
  one update per generation (TRL's default), the current logprobs detached, no extra pass, which is the
  work of spice_fast's default (``--old-logprobs sampler``: the sampler's, free); with ``--old-logprobs
  recompute`` both sides run a no-grad pass (here a padded forward with the completion logits
  materialised, ``log_softmax(logits).gather``, as TRL's ``_get_per_token_logps_and_entropies``); the
  loss by a padded forward with grad, logits for the completion positions, ``log_softmax`` + gather,
  ``policy_loss_ref`` (the same clipped Dr. GRPO loss in plain torch), backward, gradient clipping
  and ``torch.optim.AdamW``. Micro-batches hold as many padded rows as fit the same token budget
  (``loss.micro_batch_tokens``).

To time a representative iteration the bench forces the same work on both sides, which a real run
of a 135M model would not do: every completion has exactly ``--max-tokens`` tokens (``ignore_eos``;
``min_new_tokens`` in transformers); a challenger output that does not parse into a valid task is
replaced by a fixed arithmetic question with a known integer answer (FALLBACK_QUESTIONS), so the
reasoner phase always has B x G questions (the challenger reward of such a sample is still rho); and
every trained sequence gets its real advantage plus a seeded +-0.01 offset, the same on both sides,
so that no sequence is skipped by the update for having advantage 0. The reasoner trains on one
question per document (``--reasoner-questions one``, seeded) or all of them. The sampled tokens
differ between the sides (different random streams), so a side may parse a valid task the other does
not; the counts are printed.

Prints time per phase (rollout, matching, old logprobs, update; ``other`` is prompt encoding,
parsing, padding, advantages), the total, generated tokens/s and peak memory of each side with the
gain (common / spice_fast for time and memory, spice_fast / common for tokens/s), then one JSON line.
Each side runs on its own, back to back as a training run would: its warm-up, one iteration that
measures peak memory, then ``--repeats`` timed iterations (the median is reported). Peak memory is the
resident-set peak over that iteration (``common.PeakMemory``, which first hands the freed heap back
to the system); spice_fast's also counts its KV pool, which is allocated once, sized for the
iteration, before the measurement. The timed iterations run on the heap the side's earlier
iterations left, as in a run's steady state: a trimmed heap makes every large tensor page-fault in
again.

Target: the whole iteration at least 3x faster than the common way on the 2-core CPU. The bench
prints whether it was met in this run.

    python benches/bench_step.py                         # the embedded default: B=2, G=K=4, 128 tokens
    python benches/bench_step.py --max-doc-tokens 120 --max-tokens 48    # shorter (the defaults to 11/2026)
    python benches/bench_step.py --num-docs 1 -G 2 -K 2 --max-tokens 16  # quick check
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sampler import hf_twin  # noqa: E402
from common import PeakMemory, print_json, print_table, sync  # noqa: E402
from spice_fast.kernels import policy_loss_ref  # noqa: E402

import spice_fast  # noqa: E402
from spice_fast.engine import Engine, SamplingParams  # noqa: E402
from spice_fast.model import PagedKVCache  # noqa: E402
from spice_fast.spice import prompts  # noqa: E402
from spice_fast.spice.corpus import Corpus  # noqa: E402
from spice_fast.spice.parsing import Task, parse_challenger  # noqa: E402
from spice_fast.spice.rewards import challenger_reward, reasoner_rewards, role_advantages  # noqa: E402
from spice_fast.train import make_config  # noqa: E402
from spice_fast.train.rollout import Sequence, derive_seed, new_record  # noqa: E402
from spice_fast.train.update import learning_rate, make_optimizer, policy_update  # noqa: E402

FALLBACK_QUESTIONS = [  # (question, integer answer) for challenger samples that wrote no valid task
    ("What is 17 times 23?", "391"),
    ("What is 144 divided by 12?", "12"),
    ("What is 2 to the power of 10?", "1024"),
    ("What is the sum of the integers from 1 to 20?", "210"),
    ("What is 15 percent of 240?", "36"),
    ("How many minutes are there in 7 hours?", "420"),
    ("What is the remainder when 100 is divided by 7?", "2"),
    ("What is 999 plus 1234?", "2233"),
]
ADV_OFFSET = 0.01  # seeded +-offset added to every advantage so that no sequence is skipped
PHASES = ("rollout", "matching", "old_logprobs", "update", "other", "total")


def build_config(args, num_docs: int, g: int, k: int, max_tokens: int):
    return make_config(
        overrides=[
            f"seed={args.seed}", f"spice.num_docs={num_docs}", f"spice.num_challenger_samples={g}",
            f"spice.num_reasoner_samples={k}", f"spice.reasoner_questions={args.reasoner_questions}",
            f"rollout.challenger_max_tokens={max_tokens}", f"rollout.reasoner_max_tokens={max_tokens}",
            f"corpus.max_doc_tokens={args.max_doc_tokens}", f"loss.old_logprobs={args.old_logprobs}",
            f"loss.replay_activations={not args.no_replay}",
        ]
    )  # fmt: skip


def challenger_work(tokenizer, documents, config, step) -> list[tuple[int, str, list[int]]]:
    """(document, answer type, prompt ids) of every challenger sample, in (document, sample) order."""
    rng = random.Random(derive_seed("spice.rollout", config.seed, step))
    s = config.spice
    work = []
    for d, doc in enumerate(documents):
        types = [prompts.draw_answer_type(rng, s.answer_type_mix) for _ in range(s.num_challenger_samples)]
        for t in types:
            text = prompts.challenger_prompt(doc.text, t)
            work.append((d, t, prompts.encode(tokenizer, text, challenger_prefix(config))))
    return work


def challenger_prefix(config) -> str:
    """The start of the challenger's reply that the trainer puts in the prompt (read back by the parser)."""
    return prompts.CHALLENGER_PREFIX if config.spice.prefill_question_tag else ""


def task_or_fallback(text: str, answer_type: str, index: int, config) -> tuple[Task, bool]:
    parsed = parse_challenger(
        challenger_prefix(config) + text, answer_type, max_question_chars=config.spice.max_question_chars
    )
    if isinstance(parsed, Task):
        return parsed, True
    question, answer = FALLBACK_QUESTIONS[index % len(FALLBACK_QUESTIONS)]
    return Task(question, answer, "integer"), False


def reasoner_prompt_ids(tokenizer, task: Task) -> list[int]:
    return prompts.encode(tokenizer, prompts.reasoner_prompt(task.question, list(task.options or [])))


def trained_questions(config, step: int, num_questions: int) -> tuple[list[int], random.Random]:
    """The questions the reasoner trains on (one per document, seeded, or all) and the seeded stream
    that ``advantages`` goes on drawing from."""
    num_g = config.spice.num_challenger_samples
    rng = random.Random(derive_seed("bench_step.advantages", config.seed, step))
    if config.spice.reasoner_questions == "all":
        return list(range(num_questions)), rng
    return [d * num_g + rng.randrange(num_g) for d in range(num_questions // num_g)], rng


def advantages(valid: list[bool], rewards: list[float], config, step: int):
    """Challenger advantages [B*G], the trained question indices and their reasoner advantages
    [len(trained)*K], each with the seeded offset of the module docstring."""
    s = config.spice
    num_g, num_k = s.num_challenger_samples, s.num_reasoner_samples
    c_rewards = [
        challenger_reward(int(sum(rewards[q * num_k : (q + 1) * num_k])), num_k) if ok else s.invalid_reward
        for q, ok in enumerate(valid)
    ]
    trained, rng = trained_questions(config, step, len(valid))
    r_rewards = [rewards[q * num_k + j] for q in trained for j in range(num_k)]
    r_groups = [i for i in range(len(trained)) for _ in range(num_k)]
    c_adv, r_adv = role_advantages(c_rewards, [q // num_g for q in range(len(valid))], r_rewards, r_groups)

    def offset(a: float) -> float:
        delta = rng.choice((-ADV_OFFSET, ADV_OFFSET))
        return a + delta if a + delta != 0 else delta

    return [offset(a) for a in c_adv.tolist()], trained, [offset(a) for a in r_adv.tolist()]


# ---- spice_fast ----


def ours_iteration(model, engine, optimizer, tokenizer, documents, config, step) -> dict:
    r, s = config.rollout, config.spice
    t = dict.fromkeys(PHASES, 0.0)
    start = time.perf_counter()
    work = challenger_work(tokenizer, documents, config, step)
    groups: dict[tuple[int, str], list[int]] = {}  # one request per (document, answer type)
    for i, (d, answer_type, _) in enumerate(work):
        groups.setdefault((d, answer_type), []).append(i)
    keys = sorted(groups)
    # as the trainer does: the k-th request of every document first, so the engine's prefix cache
    # prefills each document once
    keys = sorted(keys, key=lambda key: (sum(1 for other in keys if other[0] == key[0] and other < key), key))

    def params(n, max_tokens, *seed):
        return SamplingParams(
            n=n, temperature=r.temperature, top_p=r.top_p, max_tokens=max_tokens, seed=derive_seed(*seed),
            ignore_eos=True,
        )  # fmt: skip

    # as the trainer does (rollout.new_record): the decode steps record their products for the
    # update to reuse, when the run can (float32 CPU, sampler logprobs)
    trained, _ = trained_questions(config, step, len(work))
    num_rows = len(work) * (r.challenger_max_tokens - 1) + sum(len(work[groups[key][0]][2]) for key in keys)
    num_rows += len(trained) * (s.num_reasoner_samples * (r.reasoner_max_tokens - 1) + r.max_model_len)
    record = new_record(engine, config, num_rows)
    if record is not None:
        for i, key in enumerate(keys):
            for g in range(len(groups[key])):
                record.reserve(("c", i, g), r.challenger_max_tokens - 1)
        for q in trained:
            for j in range(s.num_reasoner_samples):
                record.reserve(("r", q, j), r.reasoner_max_tokens - 1)
    t0 = time.perf_counter()
    outs = engine.generate(
        [work[groups[key][0]][2] for key in keys],
        [params(len(groups[key]), r.challenger_max_tokens, "challenger", config.seed, step, *key)
         for key in keys],
        record=record, record_tag="c",
    )  # fmt: skip
    t["rollout"] += time.perf_counter() - t0
    num_tokens = engine.stats.num_generated_tokens
    completions = [None] * len(work)
    prompt_ids = [None] * len(work)
    record_keys = [None] * len(work)
    for r_i, (key, out) in enumerate(zip(keys, outs, strict=True)):
        for g, (i, completion) in enumerate(zip(groups[key], out.outputs, strict=True)):
            completions[i], prompt_ids[i], record_keys[i] = completion, out.prompt_token_ids, ("c", r_i, g)

    tasks = [
        task_or_fallback(c.text, w[1], i, config)
        for i, (c, w) in enumerate(zip(completions, work, strict=True))
    ]
    t0 = time.perf_counter()
    r_outs = engine.generate(
        [reasoner_prompt_ids(tokenizer, task) for task, _ in tasks],
        [params(s.num_reasoner_samples, r.reasoner_max_tokens, "reasoner", config.seed, step, q)
         for q in range(len(tasks))],
        record=record, record_tag="r",
    )  # fmt: skip
    t["rollout"] += time.perf_counter() - t0
    num_tokens += engine.stats.num_generated_tokens

    t0 = time.perf_counter()
    responses = [c.text for out in r_outs for c in out.outputs]
    golds = [task.answer for task, _ in tasks for _ in range(s.num_reasoner_samples)]
    types = [task.answer_type for task, _ in tasks for _ in range(s.num_reasoner_samples)]
    rewards = reasoner_rewards(responses, golds, types)
    t["matching"] = time.perf_counter() - t0

    valid = [ok for _, ok in tasks]
    c_adv, trained, r_adv = advantages(valid, rewards, config, step)
    sequences = [
        Sequence(
            "challenger",
            prompt_ids[i],
            c.token_ids,
            c.logprobs,
            a,
            ("document", work[i][0]),
            record,
            record_keys[i],
        )
        for i, (c, a) in enumerate(zip(completions, c_adv, strict=True))
    ]  # fmt: skip  (the samples of a document share its prompt prefix: the update runs it once)
    r_rows = [(q, r_outs[q].prompt_token_ids, j, c) for q in trained for j, c in enumerate(r_outs[q].outputs)]
    sequences += [
        Sequence("reasoner", p, c.token_ids, c.logprobs, a, ("question", q), record, ("r", q, j))
        for (q, p, j, c), a in zip(r_rows, r_adv, strict=True)
    ]
    t0 = time.perf_counter()
    metrics = policy_update(model, optimizer, sequences, config, learning_rate(config, max(step, 1)))
    sync(model.device)
    update_time = time.perf_counter() - t0
    t["old_logprobs"] = metrics["time/logprob"]
    t["update"] = update_time - t["old_logprobs"]
    t["total"] = time.perf_counter() - start
    assert metrics["update/num_zero_advantage"] == 0 and not metrics["skipped"], metrics
    return t | {
        "gen_tokens": num_tokens, "num_valid": sum(valid), "num_sequences": len(sequences),
        "update_tokens": metrics["update/num_tokens"], "micro_batches": metrics["update/num_micro_batches"],
        "forward_tokens": metrics["update/num_forward_tokens"],
        "replayed_tokens": metrics["update/num_replayed_tokens"],
    }  # fmt: skip


# ---- the common way ----


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def hf_generate(hf, tokenizer, rows, n, max_tokens, config, stop_ids, pad_id):
    """[len(rows) * n, P + max_tokens] prompt + completion ids, prompt mask width P, decoded texts."""
    ids, mask = left_pad(rows, pad_id, hf.device)
    out = hf.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=config.rollout.temperature,
        top_p=config.rollout.top_p, top_k=0, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
        num_return_sequences=n, eos_token_id=stop_ids, pad_token_id=pad_id,
    )  # fmt: skip
    texts = tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
    return out, mask.repeat_interleave(n, dim=0), texts


def math_verify_rewards(responses: list[str], golds: list[str]) -> list[float]:
    """TRL's accuracy reward: gold parsed as given, the response's boxed answer first."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify

    normalization = NormalizationConfig(
        nits=False, malformed_operators=False, basic_latex=True, equations=True, boxed="all", units=True
    )
    answer_config = [
        LatexExtractionConfig(
            normalization_config=normalization, boxed_match_priority=0, try_extract_without_anchor=False
        )
    ]
    out = []
    for response, gold in zip(responses, golds, strict=True):
        gold_parsed = parse(gold, extraction_mode="first_match")
        if not gold_parsed:
            out.append(0.0)  # TRL skips such a sample (None); here it scores 0
            continue
        answer_parsed = parse(response, extraction_config=answer_config, extraction_mode="first_match")
        try:
            out.append(float(verify(gold_parsed, answer_parsed)))
        except Exception:  # as TRL: math-verify can raise on odd parses; count it as wrong
            out.append(0.0)
    return out


def completion_logprobs(hf, ids, mask, num_new: int, temperature: float) -> torch.Tensor:
    """[rows, num_new] logprobs of the last num_new tokens, the completion logits materialised."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = hf(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=num_new + 1).logits
    logits = logits[:, :-1].float() / temperature  # [rows, num_new, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, -num_new:, None]).squeeze(-1)


def common_iteration(hf, optimizer, tokenizer, documents, config, step, stop_ids, pad_id) -> dict:
    r, s, loss_cfg = config.rollout, config.spice, config.loss
    num_k = s.num_reasoner_samples
    t = dict.fromkeys(PHASES, 0.0)
    start = time.perf_counter()
    work = challenger_work(tokenizer, documents, config, step)
    torch.manual_seed(derive_seed("bench_step.common", config.seed, step))

    t0 = time.perf_counter()
    with torch.no_grad():
        c_out, c_mask, c_texts = hf_generate(
            hf, tokenizer, [w[2] for w in work], 1, r.challenger_max_tokens, config, stop_ids, pad_id
        )
    sync(hf.device)
    t["rollout"] += time.perf_counter() - t0

    tasks = [
        task_or_fallback(text, w[1], i, config) for i, (text, w) in enumerate(zip(c_texts, work, strict=True))
    ]
    r_prompts = [reasoner_prompt_ids(tokenizer, task) for task, _ in tasks]
    t0 = time.perf_counter()
    with torch.no_grad():
        r_out, r_mask, r_texts = hf_generate(
            hf, tokenizer, r_prompts, num_k, r.reasoner_max_tokens, config, stop_ids, pad_id
        )
    sync(hf.device)
    t["rollout"] += time.perf_counter() - t0
    num_tokens = c_out.shape[0] * r.challenger_max_tokens + r_out.shape[0] * r.reasoner_max_tokens

    t0 = time.perf_counter()
    rewards = math_verify_rewards(r_texts, [task.answer for task, _ in tasks for _ in range(num_k)])
    t["matching"] = time.perf_counter() - t0

    valid = [ok for _, ok in tasks]
    c_adv, trained, r_adv = advantages(valid, rewards, config, step)
    rows = torch.tensor([q * num_k + j for q in trained for j in range(num_k)], device=hf.device)
    r_out, r_mask = r_out.index_select(0, rows), r_mask.index_select(0, rows)
    first = int((r_mask.sum(0) > 0).nonzero()[0])  # drop columns that are padding in every kept row
    batches = []  # (ids, attention mask, completion length, advantages) per padded micro-batch
    for out, prompt_mask, num_new, adv in (
        (c_out, c_mask, r.challenger_max_tokens, c_adv),
        (r_out[:, first:], r_mask[:, first:], r.reasoner_max_tokens, r_adv),
    ):
        mask = torch.cat([prompt_mask, torch.ones_like(out[:, prompt_mask.shape[1] :])], dim=1)
        per_batch = max(1, loss_cfg.micro_batch_tokens // out.shape[1])
        adv = torch.tensor(adv, dtype=torch.float32, device=hf.device)
        for i in range(0, out.shape[0], per_batch):
            batches.append((out[i : i + per_batch], mask[i : i + per_batch], num_new, adv[i : i + per_batch]))
    num_sequences = sum(b[0].shape[0] for b in batches)

    old = [None] * len(batches)  # TRL's default: the current logprobs, detached (ratio 1)
    if loss_cfg.old_logprobs == "recompute":
        t0 = time.perf_counter()
        with torch.no_grad():
            old = [completion_logprobs(hf, ids, mask, n, r.temperature) for ids, mask, n, _ in batches]
        sync(hf.device)
        t["old_logprobs"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for (ids, mask, num_new, adv), old_lp in zip(batches, old, strict=True):
        lp = completion_logprobs(hf, ids, mask, num_new, r.temperature)
        old_lp = lp.detach() if old_lp is None else old_lp
        loss, _ = policy_loss_ref(
            lp, old_lp, adv, torch.ones_like(lp), clip_low=loss_cfg.clip_low, clip_high=loss_cfg.clip_high,
            agg="drgrpo", max_new_tokens=config.loss_max_new_tokens,
        )  # fmt: skip
        (loss * ids.shape[0] / num_sequences).backward()  # the Dr. GRPO constant of the whole step
    if config.optim.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(hf.parameters(), config.optim.max_grad_norm)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, max(step, 1))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync(hf.device)
    t["update"] = time.perf_counter() - t0
    t["total"] = time.perf_counter() - start
    return t | {
        "gen_tokens": num_tokens, "num_valid": sum(valid), "num_sequences": num_sequences,
        "update_tokens": sum(b[0].shape[0] * b[2] for b in batches), "micro_batches": len(batches),
        "padded_tokens": sum(b[0].numel() for b in batches),
    }  # fmt: skip


# ---- driver ----


def kv_gb(
    model, tokenizer, challenger_lens: list[list[int]], num_k: int, max_tokens: int, block: int
) -> float:
    """A KV pool that holds the largest phase of any timed iteration (reasoner questions are bounded by
    the challenger output they come from); a smaller pool would only make the engine preempt."""
    blocks = lambda n: -(-n // block)
    template = reasoner_prompt_ids(tokenizer, Task("x", "A", "mcq", ("y",) * 4))
    fallback = max(len(reasoner_prompt_ids(tokenizer, Task(q, a, "integer"))) for q, a in FALLBACK_QUESTIONS)
    reasoner_len = max(fallback, len(template) + 2 * max_tokens + 16) + max_tokens
    num_blocks = 0
    for lens in challenger_lens:
        challenger = sum(blocks(n + max_tokens) for n in lens)
        reasoner = len(lens) * num_k * (blocks(reasoner_len) + 1)
        num_blocks = max(num_blocks, challenger, reasoner)
    return num_blocks * PagedKVCache.bytes_per_block(model.config, block, model.dtype) / 1024**3


def run_side(fn, device) -> dict:
    out = fn()
    out["other"] = out["total"] - sum(out[p] for p in PHASES[:4])
    return out


def peak_bytes(fn, device) -> int | None:
    with PeakMemory(device) as peak:
        fn()
    return peak.bytes


def summarize(runs: dict[str, list[dict]], kv_bytes: int) -> dict[str, dict]:
    """Median of each phase over the repeats, tokens/s, the largest peak (spice_fast's plus its KV pool)."""
    med = {}
    for side, rs in runs.items():
        m = {p: statistics.median(x[p] for x in rs) for p in PHASES}
        m["tokens_per_s"] = rs[0]["gen_tokens"] / max(m["rollout"], 1e-9)
        peaks = [x["peak_bytes"] for x in rs]
        m["peak_bytes"] = None if None in peaks else max(peaks) + (kv_bytes if side == "ours" else 0)
        med[side] = m
    return med


def report(args, device, runs, med, challenger_lens) -> None:
    c, u = med["common"], med["ours"]
    gain = lambda a, b: a / b if a and b else None
    mib = lambda b: b / 2**20 if b is not None else "-"
    rows = [[p, c[p], u[p], gain(c[p], u[p]) or "-"] for p in PHASES]
    rows.append(
        ["gen tokens/s", c["tokens_per_s"], u["tokens_per_s"], gain(u["tokens_per_s"], c["tokens_per_s"])]
    )
    peak_gain = gain(c["peak_bytes"], u["peak_bytes"]) or "-"
    rows.append(["peak MiB", mib(c["peak_bytes"]), mib(u["peak_bytes"]), peak_gain])
    speedup = c["total"] / u["total"]
    met = speedup >= 3.0
    first = {side: rs[0] for side, rs in runs.items()}
    if not args.json_only:
        print(
            f"\nSPICE iteration, {args.model}, {args.dtype}, {device} ({torch.get_num_threads()} threads): "
            f"B={args.num_docs} documents (<= {args.max_doc_tokens} tokens), G={args.G}, K={args.K}, "
            f"{args.max_tokens} new tokens per completion, reasoner questions: {args.reasoner_questions}, "
            f"spice_fast old logprobs: {args.old_logprobs}; median of {args.repeats}, {args.warmup} warm-up"
        )
        for side, name in (("common", "common way"), ("ours", "spice_fast")):
            x = first[side]
            padded = f" ({x['padded_tokens']} padded tokens)" if "padded_tokens" in x else ""
            if "forward_tokens" in x:
                padded = (
                    f" ({x['forward_tokens']} tokens forwarded, shared prompts once; the layer products of "
                    f"{x['replayed_tokens']} taken from the sampler's record)"
                )
            print(
                f"  {name}: {x['gen_tokens']} generated tokens, {x['num_valid']}/{args.num_docs * args.G} "
                f"valid challenger tasks, update over {x['num_sequences']} sequences / "
                f"{x['update_tokens']} completion tokens in {x['micro_batches']} micro-batches{padded}"
            )
        print("  seconds; gain = common / spice_fast (time, memory) or spice_fast / common (tokens/s)")
        print_table(["phase", "common", "spice_fast", "gain"], rows)
        print(
            "target (whole iteration >= 3x faster than the common way on the 2-core CPU): "
            f"{'met' if met else 'NOT met'} ({speedup:.2f}x here)"
        )
    results = [{"phase": p, "common_s": c[p], "ours_s": u[p], "gain": gain(c[p], u[p])} for p in PHASES]
    results.append({"phase": "gen_tokens_per_s", "common": c["tokens_per_s"], "ours": u["tokens_per_s"]})
    results.append({"phase": "peak_bytes", "common": c["peak_bytes"], "ours": u["peak_bytes"]})
    print_json(
        "step", device, results, model=args.model, dtype=args.dtype, num_docs=args.num_docs, G=args.G,
        K=args.K, max_tokens=args.max_tokens, max_doc_tokens=args.max_doc_tokens,
        challenger_prompt_tokens=challenger_lens, reasoner_questions=args.reasoner_questions,
        old_logprobs=args.old_logprobs, replay=not args.no_replay, repeats=args.repeats, warmup=args.warmup,
        speedup=speedup, target_met=met, details=first,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-docs", type=int, default=2, help="B: documents per iteration")
    parser.add_argument("-G", type=int, default=4, help="challenger samples per document")
    parser.add_argument("-K", type=int, default=4, help="reasoner samples per question")
    # defaults: the lengths of the trainer's default preset, cpu-tiny (the embedded default run)
    parser.add_argument("--max-tokens", type=int, default=128, help="new tokens of every completion")
    parser.add_argument("--max-doc-tokens", type=int, default=200)
    parser.add_argument("--reasoner-questions", choices=("one", "all"), default="one")
    parser.add_argument("--old-logprobs", choices=("sampler", "recompute"), default="sampler",
                        help="old logprobs: the sampler's (the common way: TRL's default, the current ones "
                             "detached) or a recompute pass on both sides")  # fmt: skip
    parser.add_argument("--no-replay", action="store_true",
                        help="spice_fast's update computes every row (replay_activations=false)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations per side (median)")
    parser.add_argument("--warmup", type=int, default=1, help="short iterations per side first (4 tokens)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-only", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    log = (lambda *a, **k: None) if args.json_only else print

    config = build_config(args, args.num_docs, args.G, args.K, args.max_tokens)
    model, tokenizer = spice_fast.load(args.model, dtype=args.dtype, device=device)
    model.train()
    hf = hf_twin(model)  # copies of the same weights, before either side updates them
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))
    corpus = Corpus(config.corpus, count_tokens=count)
    documents = corpus.next_batch(args.num_docs * args.repeats)
    batches = [documents[i * args.num_docs : (i + 1) * args.num_docs] for i in range(args.repeats)]
    challenger_lens = [
        [len(w[2]) for w in challenger_work(tokenizer, docs, config, step)]
        for step, docs in enumerate(batches, start=1)
    ]
    r = config.rollout
    engine = Engine(
        model, tokenizer, max_num_seqs=args.num_docs * args.G * args.K, max_model_len=r.max_model_len,
        block_size=r.block_size,
        kv_cache_gb=kv_gb(model, tokenizer, challenger_lens, args.K, args.max_tokens, r.block_size),
    )  # fmt: skip
    ours_opt = make_optimizer(model, config)
    o = config.optim
    common_opt = torch.optim.AdamW(
        hf.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay
    )
    stop_ids = engine.stop_token_ids
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]

    def ours(cfg, docs, step):
        return lambda: ours_iteration(model, engine, ours_opt, tokenizer, docs, cfg, step)

    def common(cfg, docs, step):
        return lambda: common_iteration(hf, common_opt, tokenizer, docs, cfg, step, stop_ids, pad_id)

    warm_cfg = build_config(args, 1, min(args.G, 2), min(args.K, 2), 4)
    runs: dict[str, list[dict]] = {"common": [], "ours": []}
    # Each side alone and back to back, as a training run would be: interleaving the sides would start
    # every iteration on the heap the other side just freed.
    for name, label, side in (("common", "the common way", common), ("ours", "spice_fast", ours)):
        for i in range(args.warmup):  # kernels, allocator, optimizer state
            log(f"{label}: warm-up {i + 1}/{args.warmup} ...", flush=True)
            side(warm_cfg, documents[:1], 0)()
        log(f"{label}: peak memory of one iteration ...", flush=True)
        peak = peak_bytes(side(config, batches[0], 1), device)
        for step, docs in enumerate(batches, start=1):
            log(f"{label}: iteration {step}/{args.repeats} ...", end=" ", flush=True)
            runs[name].append(run_side(side(config, docs, step), device) | {"peak_bytes": peak})
            log(f"{runs[name][-1]['total']:.1f} s", flush=True)
    report(args, device, runs, summarize(runs, engine.kv_cache_bytes), challenger_lens)


if __name__ == "__main__":
    main()
