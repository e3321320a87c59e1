"""One SPICE rollout: challenger tasks from documents, reasoner answers, rewards and advantages.

``spice_rollout(engine, tokenizer, documents, config, step)`` runs the sampling half of one iteration
of ../shared/SPICE.md and returns the sequences to train on (prompt ids, completion ids, the sampler's
logprobs, the advantage) and the step's statistics:

1. B documents x G challenger samples; the answer type is drawn per sample, and the samples of a
   document that share a type are one engine request (the prompt is prefilled once for them).
2. Each output is parsed strictly; invalid ones get ``rho`` and a counted reason.
3. Every valid task gets K reasoner samples (the question only, never the document); the matcher
   scores them; the pass rate gives the Gaussian challenger reward.
4. Dr. GRPO advantages per role: challenger groups are the G samples of a document, reasoner groups the
   K answers to one question. The reasoner trains on one valid question per document (chosen with a
   seeded draw) or on all of them.

On a float32 CPU run the prefill and decode steps of every sequence the update will train record
their layer products (``new_record``; the update reuses them, spice_fast.model.replay).

All randomness (answer types, sampling noise, question choice) is derived from (seed, step), so a
resumed run draws exactly what an uninterrupted one would. Tested by tests/test_train.py.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from spice_fast.engine import Engine, SamplingParams
from spice_fast.model.replay import ActivationRecord, record_bytes
from spice_fast.spice import prompts
from spice_fast.spice.corpus import Document
from spice_fast.spice.parsing import INVALID_REASONS, Invalid, Task, parse_challenger
from spice_fast.spice.rewards import challenger_reward, reasoner_rewards, role_advantages
from spice_fast.train.config import TrainConfig


@dataclass
class Sequence:
    """One sampled completion to train on."""

    role: str  # "challenger" or "reasoner"
    prompt_ids: list[int]
    completion_ids: list[int]
    sampler_logprobs: list[float]  # the engine's log_softmax(logits / T) of each completion token
    advantage: float
    prefix_group: object = None  # sequences of one group share a prompt prefix (run once in training)
    record: ActivationRecord | None = None  # the sampler's layer products of its rows, if recorded
    record_key: object = None  # its key in ``record``


@dataclass
class RolloutResult:
    sequences: list[Sequence]  # every sequence of the update (both roles), zero advantages included
    metrics: dict[str, Any]
    samples: list[dict[str, Any]] = field(default_factory=list)  # readable examples for samples.jsonl


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts: the same on every platform and run (no Python hash randomisation)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _sampling(config: TrainConfig, n: int, max_tokens: int, seed: int) -> SamplingParams:
    r = config.rollout
    return SamplingParams(n=n, temperature=r.temperature, top_p=r.top_p, max_tokens=max_tokens, seed=seed)


def spice_rollout(
    engine: Engine,
    tokenizer: Any,
    documents: list[Document],
    config: TrainConfig,
    step: int,
    doc_ids: list[int] | None = None,
    progress: bool = False,
) -> RolloutResult:
    """``doc_ids``: each document's index in the step's global batch (default 0..len-1). Every draw is
    keyed on (seed, step, doc id), so a document gets the same samples whichever rank runs it.
    ``progress``: a transient progress bar per generation phase."""
    s, r = config.spice, config.rollout
    doc_ids = list(range(len(documents))) if doc_ids is None else list(doc_ids)
    if len(doc_ids) != len(documents):
        raise ValueError(f"doc_ids: expected {len(documents)} ids, got {len(doc_ids)}")
    timings = Counter()
    max_prompt = r.max_model_len - 1
    prefix = prompts.CHALLENGER_PREFIX if s.prefill_question_tag else ""

    # ---- 1. challenger: B documents x G samples, one request per (document, answer type) ----
    requests, request_meta, ranks = [], [], []  # meta: (document index, answer type, sample indices)
    num_skipped_docs = 0
    for d, doc in enumerate(documents):
        rng = random.Random(derive_seed("answer_types", config.seed, step, doc_ids[d]))
        types = [prompts.draw_answer_type(rng, s.answer_type_mix) for _ in range(s.num_challenger_samples)]
        encoded = {
            t: prompts.encode(tokenizer, prompts.challenger_prompt(doc.text, t), prefix)
            for t in sorted(set(types))
        }
        if max(len(ids) for ids in encoded.values()) > max_prompt:
            num_skipped_docs += 1  # dropped whole, so that its challenger group stays complete
            continue
        for rank, (answer_type, ids) in enumerate(encoded.items()):
            requests.append(ids)
            request_meta.append((d, answer_type, [g for g, t in enumerate(types) if t == answer_type]))
            ranks.append(rank)
    # the k-th answer type of every document first, then the (k+1)-th: the engine prefills a document
    # once and lets its other requests read the cached blocks a step later
    order = sorted(range(len(request_meta)), key=lambda i: (ranks[i], i))
    requests, request_meta = [requests[i] for i in order], [request_meta[i] for i in order]
    params = [
        _sampling(
            config,
            len(slots),
            r.challenger_max_tokens,
            derive_seed("challenger", config.seed, step, doc_ids[d], t),
        )
        for d, t, slots in request_meta
    ]
    num_questions = len(documents) * (1 if s.reasoner_questions == "one" else s.num_challenger_samples)
    # rows: every challenger sample's decode inputs and prompt tokens, and the same for the questions
    # the reasoner may train on (their prompts at most max_prompt tokens; only the rows used are touched)
    num_rows = sum(
        p.n * (r.challenger_max_tokens - 1) + len(ids) for p, ids in zip(params, requests, strict=True)
    )
    num_rows += num_questions * (s.num_reasoner_samples * (r.reasoner_max_tokens - 1) + max_prompt)
    record = new_record(engine, config, num_rows if requests else 0)
    if record is not None:
        for i, p in enumerate(params):
            for g in range(p.n):
                record.reserve(("challenger", i, g), r.challenger_max_tokens - 1)
    t0 = time.perf_counter()
    outs = (
        engine.generate(requests, params, progress=progress, **_recording(record, "challenger"))
        if requests
        else []
    )
    timings["rollout"] += time.perf_counter() - t0
    num_generated = engine.stats.num_generated_tokens if requests else 0

    # challenger samples in (document, sample) order
    challenger: dict[tuple[int, int], dict[str, Any]] = {}
    for i, ((d, answer_type, slots), out) in enumerate(zip(request_meta, outs, strict=True)):
        for g, (slot, completion) in enumerate(zip(slots, out.outputs, strict=True)):
            challenger[(d, slot)] = {
                "prompt_ids": out.prompt_token_ids, "completion": completion, "answer_type": answer_type,
                "record_key": ("challenger", i, g),
            }  # fmt: skip
    keys = sorted(challenger)

    # ---- 2. parse ----
    invalid = Counter()
    for key in keys:
        c = challenger[key]
        text = prefix + c["completion"].text  # the reply began in the prompt
        parsed = parse_challenger(text, c["answer_type"], max_question_chars=s.max_question_chars)
        if isinstance(parsed, Task):
            ids = prompts.encode(
                tokenizer, prompts.reasoner_prompt(parsed.question, list(parsed.options or []))
            )
            if len(ids) > max_prompt:
                parsed = Invalid("too_long", f"reasoner prompt of {len(ids)} tokens")
            else:
                c["reasoner_prompt_ids"] = ids
        c["task"] = parsed
        if isinstance(parsed, Invalid):
            invalid[parsed.reason] += 1

    # ---- 3. reasoner: K samples per valid task ----
    valid_keys = [k for k in keys if isinstance(challenger[k]["task"], Task)]
    choice_seeds = [derive_seed("question_choice", config.seed, step, i) for i in doc_ids]
    trained_questions = _trained_questions(valid_keys, s.reasoner_questions, choice_seeds)
    if record is not None:
        trained = set(trained_questions)
        for q, k in enumerate(valid_keys):
            if k in trained:
                for j in range(s.num_reasoner_samples):
                    record.reserve(("reasoner", q, j), r.reasoner_max_tokens - 1)
    t0 = time.perf_counter()
    reasoner_outs = (
        engine.generate(
            [challenger[k]["reasoner_prompt_ids"] for k in valid_keys],
            [
                _sampling(
                    config,
                    s.num_reasoner_samples,
                    r.reasoner_max_tokens,
                    derive_seed("reasoner", config.seed, step, doc_ids[k[0]], k[1]),
                )
                for k in valid_keys
            ],
            progress=progress,
            **_recording(record, "reasoner"),
        )  # fmt: skip
        if valid_keys
        else []
    )
    timings["rollout"] += time.perf_counter() - t0
    num_generated += engine.stats.num_generated_tokens if valid_keys else 0

    t0 = time.perf_counter()
    responses, golds, answer_types = [], [], []
    for k, out in zip(valid_keys, reasoner_outs, strict=True):
        task = challenger[k]["task"]
        for completion in out.outputs:
            responses.append(completion.text)
            golds.append(task.answer)
            answer_types.append(task.answer_type)
    rewards = reasoner_rewards(responses, golds, answer_types) if responses else []
    timings["matching"] += time.perf_counter() - t0

    # ---- 4. rewards and advantages ----
    num_k = s.num_reasoner_samples
    pass_hist = [0] * (num_k + 1)
    for q, k in enumerate(valid_keys):
        c = challenger[k]
        c["reasoner_outputs"] = reasoner_outs[q]
        c["reasoner_rewards"] = rewards[q * num_k : (q + 1) * num_k]
        num_correct = int(sum(c["reasoner_rewards"]))
        pass_hist[num_correct] += 1
        c["reward"] = challenger_reward(num_correct, num_k)
    for k in keys:
        if isinstance(challenger[k]["task"], Invalid):
            challenger[k]["reward"] = s.invalid_reward

    group_of = {k: q for q, k in enumerate(valid_keys)}
    reasoner_rows, reasoner_groups = [], []
    for k in trained_questions:
        for j, (completion, reward) in enumerate(zip(
            challenger[k]["reasoner_outputs"].outputs, challenger[k]["reasoner_rewards"], strict=True
        )):  # fmt: skip
            reasoner_rows.append((k, completion, reward, ("reasoner", group_of[k], j)))
            reasoner_groups.append(group_of[k])
    c_adv, r_adv = role_advantages(
        [challenger[k]["reward"] for k in keys], [k[0] for k in keys],
        [row[2] for row in reasoner_rows], reasoner_groups,
    )  # fmt: skip

    sequences = [
        Sequence("challenger", challenger[k]["prompt_ids"], challenger[k]["completion"].token_ids,
                 challenger[k]["completion"].logprobs, float(a), ("document", k[0]), record,
                 challenger[k]["record_key"])
        for k, a in zip(keys, c_adv.tolist(), strict=True)
    ]  # fmt: skip
    sequences += [
        Sequence("reasoner", challenger[k]["reasoner_prompt_ids"], completion.token_ids, completion.logprobs,
                 float(a), ("question", k), record, record_key)
        for (k, completion, _, record_key), a in zip(reasoner_rows, r_adv.tolist(), strict=True)
    ]  # fmt: skip

    metrics = _metrics(challenger, keys, valid_keys, invalid, rewards, pass_hist, num_k)
    metrics.update({
        "corpus/skipped_too_long": num_skipped_docs,
        "throughput/gen_tokens": num_generated,
        "throughput/gen_tokens_per_s": num_generated / max(timings["rollout"], 1e-9),
        "time/rollout": timings["rollout"],
        "time/matching": timings["matching"],
        "reasoner/num_trained_questions": len(trained_questions),
    })  # fmt: skip
    samples = _samples(documents, challenger, keys, prefix)
    return RolloutResult(sequences, metrics, samples)


def _recording(record: ActivationRecord | None, tag: str) -> dict[str, Any]:
    """``generate``'s keyword arguments for recording into ``record`` (none without one: an engine
    that does not record, such as a test's scripted one, is called as before)."""
    return {} if record is None else {"record": record, "record_tag": tag}


def new_record(engine: Engine, config: TrainConfig, num_rows: int) -> ActivationRecord | None:
    """A record of the sampler's layer products (prefill and decode) for the update to reuse
    (spice_fast.model.replay), when ``loss.replay_activations`` and this run can: float32 parameters
    on the CPU, old logprobs from the sampler, no gradient checkpointing, no FSDP. At most
    ``loss.replay_max_gb`` (rows beyond it get no record and are computed)."""
    loss, model = config.loss, getattr(engine, "model", None)
    if not (
        isinstance(engine, Engine) and loss.replay_activations and loss.old_logprobs == "sampler"
        and num_rows > 0 and not config.model.gradient_checkpointing and not config.optim.fsdp
        and model.device.type == "cpu" and model.dtype == torch.float32
    ):  # fmt: skip
        return None
    per_row = record_bytes(model.config, 1)
    rows = min(num_rows, int(loss.replay_max_gb * 1024**3) // per_row)
    return engine.activation_record(rows) if rows > 0 else None


def _trained_questions(
    valid_keys: list[tuple[int, int]], mode: str, seeds: list[int]
) -> list[tuple[int, int]]:
    if mode == "all":
        return list(valid_keys)
    by_doc: dict[int, list[tuple[int, int]]] = {}
    for k in valid_keys:
        by_doc.setdefault(k[0], []).append(k)
    return [random.Random(seeds[d]).choice(by_doc[d]) for d in sorted(by_doc)]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _metrics(challenger, keys, valid_keys, invalid, rewards, pass_hist, num_k) -> dict[str, Any]:
    c_lengths = [len(challenger[k]["completion"].token_ids) for k in keys]
    r_completions = [c for k in valid_keys for c in challenger[k]["reasoner_outputs"].outputs]
    metrics: dict[str, Any] = {
        "challenger/num_samples": len(keys),
        "challenger/num_valid": len(valid_keys),
        "challenger/valid_rate": len(valid_keys) / len(keys) if keys else None,
        "challenger/reward_mean": _mean([challenger[k]["reward"] for k in keys]),
        "reasoner/num_questions": len(valid_keys),
        "reasoner/accuracy": _mean(rewards),
        "reasoner/pass_rate_mean": _mean([sum(challenger[k]["reasoner_rewards"]) / num_k
                                          for k in valid_keys]),
        "reasoner/pass_rate_hist": pass_hist,
        "length/challenger_mean": _mean(c_lengths),
        "length/challenger_truncated": _mean([float(challenger[k]["completion"].finish_reason == "length")
                                              for k in keys]),
        "length/reasoner_mean": _mean([len(c.token_ids) for c in r_completions]),
        "length/reasoner_truncated": _mean([float(c.finish_reason == "length") for c in r_completions]),
    }  # fmt: skip
    metrics.update({f"challenger/invalid/{reason}": invalid[reason] for reason in INVALID_REASONS})
    return metrics


def _samples(documents, challenger, keys, prefix: str, max_samples: int = 4) -> list[dict[str, Any]]:
    """A few readable examples, valid tasks first."""
    ordered = sorted(keys, key=lambda k: (isinstance(challenger[k]["task"], Invalid), k))
    out = []
    for k in ordered[:max_samples]:
        c = challenger[k]
        task = c["task"]
        item: dict[str, Any] = {
            "document": documents[k[0]].source, "answer_type": c["answer_type"],
            "challenger_output": prefix + c["completion"].text, "challenger_reward": c["reward"],
        }  # fmt: skip
        if isinstance(task, Task):
            item["task"] = {"question": task.question, "options": task.options, "answer": task.answer}
            item["reasoner"] = [
                {"answer": o.text, "correct": bool(rw)}
                for o, rw in zip(c["reasoner_outputs"].outputs[:2], c["reasoner_rewards"], strict=False)
            ]
        else:
            item["invalid"] = {"reason": task.reason, "detail": task.detail}
        out.append(item)
    return out
