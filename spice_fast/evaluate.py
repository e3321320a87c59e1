"""Accuracy of a model on a JSONL question set, judged the way the SPICE reasoner is rewarded.

``read_eval_data(path)`` reads one question a line::

    {"question": "What is 6 * 7?", "answer": 42, "type": "integer"}
    {"question": "Which is a prime?", "choices": ["4", "6", "7", "9"], "answer": "C"}
    {"question": "...", "choices": {"A": "...", "B": "...", "C": "...", "D": "..."}, "answer": "text of one"}

``type`` is one of ``spice_fast.spice.prompts.ANSWER_TYPES`` ("mcq" when choices are given; absent =
the matcher infers it). A multiple-choice answer is a letter A-D or the text of one choice, stored as
its letter. Bad lines are skipped and counted per ``SKIP_REASONS``, with one warning.

``evaluate(model, tokenizer, records)`` builds the reasoner prompt of each question
(``prompts.reasoner_prompt`` + ``prompts.render``), generates one completion per question with the
paged engine (greedy by default) and ``score``s the responses with ``rewards.reasoner_rewards``: 1
when the ``\\boxed{}`` answer matches the gold answer, the training reward, so eval accuracy and
training accuracy mean the same thing. ``score`` is separate so that responses from anywhere can be
judged. ``spice-fast eval`` is ``cmd_eval``.

Tests: ``pytest tests/test_eval.py``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spice_fast import match
from spice_fast.match import has_box
from spice_fast.spice.prompts import ANSWER_TYPES, encode, reasoner_prompt

logger = logging.getLogger(__name__)

SKIP_REASONS = (
    "invalid_json",  # not UTF-8 JSON (a truncated line included)
    "not_an_object",  # JSON, but not an object
    "missing_field",  # no "question" or no "answer"
    "empty_field",  # question or answer empty or blank
    "wrong_type",  # question not a string, answer not a string or finite number, type not a string
    "bad_type",  # type not one of ANSWER_TYPES, or choices with a type other than "mcq" (or the reverse)
    "bad_choices",  # choices not 4 non-empty strings (a list, or an object with keys A-D)
    "answer_not_in_choices",  # multiple-choice answer neither a letter A-D nor the text of one choice
)
AUTO_TYPE = "auto"  # per-type key of records without a type (the matcher infers it)
TOO_LONG = "prompt_too_long"  # finish reason of a record whose prompt does not fit max_model_len
_MAX_NAMED_LINES = 5
_LETTERS = "ABCD"
_LETTER = re.compile(r"^\(?\s*([A-Da-d])\s*\)?\.?$")


@dataclass(frozen=True)
class EvalRecord:
    question: str
    answer: str  # gold answer; the letter A-D for multiple choice
    answer_type: str | None  # one of ANSWER_TYPES, None = inferred by the matcher
    choices: tuple[str, ...] | None = None  # the four option texts, multiple choice only
    line: int = 0  # 1-based line number in the data file


@dataclass
class Prediction:
    index: int  # position among the evaluated records
    line: int  # line number in the data file
    question: str
    choices: list[str] | None
    gold: str
    type: str | None
    response: str
    extracted: str | None  # spice_fast.match.extract_answer of the response
    correct: bool
    finish_reason: str  # "stop", "length" or "prompt_too_long"


@dataclass
class EvalResult:
    predictions: list[Prediction]
    num_generated_tokens: int = 0
    elapsed_s: float = 0.0  # generation time

    @property
    def num_records(self) -> int:
        return len(self.predictions)

    @property
    def num_correct(self) -> int:
        return sum(p.correct for p in self.predictions)

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_records if self.predictions else 0.0

    @property
    def num_unboxed(self) -> int:
        return sum(not has_box(p.response) for p in self.predictions)

    @property
    def num_truncated(self) -> int:
        return sum(p.finish_reason == "length" for p in self.predictions)

    @property
    def num_prompt_too_long(self) -> int:
        return sum(p.finish_reason == TOO_LONG for p in self.predictions)

    @property
    def tokens_per_s(self) -> float:
        return self.num_generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def per_type(self) -> dict[str, dict[str, float]]:
        """``{type: {"count", "num_correct", "accuracy"}}``, types in ANSWER_TYPES order, then "auto"."""
        out: dict[str, dict[str, float]] = {}
        for key in (*ANSWER_TYPES, AUTO_TYPE):
            preds = [p for p in self.predictions if (p.type or AUTO_TYPE) == key]
            if preds:
                num_correct = sum(p.correct for p in preds)
                out[key] = {"count": len(preds), "num_correct": num_correct}
                out[key]["accuracy"] = num_correct / len(preds)
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "num_records": self.num_records,
            "num_correct": self.num_correct,
            "per_type": self.per_type,
            "num_unboxed": self.num_unboxed,
            "num_truncated": self.num_truncated,
            "num_prompt_too_long": self.num_prompt_too_long,
            "num_generated_tokens": self.num_generated_tokens,
            "elapsed_s": round(self.elapsed_s, 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
        }


# ---- data ----


def read_eval_data(path: str | os.PathLike) -> tuple[list[EvalRecord], dict[str, int]]:
    """The usable records of a JSONL file and ``{reason: count}`` of the skipped lines (reasons that
    occurred, in SKIP_REASONS order). Blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"eval data file not found: {str(path)!r}")
    records: list[EvalRecord] = []
    skipped: dict[str, list[int]] = {}
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        parsed = parse_record(raw, number)
        if isinstance(parsed, str):
            skipped.setdefault(parsed, []).append(number)
        else:
            records.append(parsed)
    counts = {reason: len(skipped[reason]) for reason in SKIP_REASONS if reason in skipped}
    if skipped:
        named = "; ".join(
            f"{reason} {len(lines)} (line {', '.join(map(str, lines[:_MAX_NAMED_LINES]))}"
            f"{', ...' if len(lines) > _MAX_NAMED_LINES else ''})"
            for reason, lines in ((r, skipped[r]) for r in SKIP_REASONS if r in skipped)
        )
        logger.warning("skipped %d bad lines of %s: %s", sum(counts.values()), path, named)
    if not records:
        raise ValueError(f"eval data file {str(path)!r} has no usable line (skipped: {counts or 'none'})")
    return records, counts


def parse_record(raw: bytes | str, line: int = 0) -> EvalRecord | str:
    """One JSONL line as an ``EvalRecord``, or the SKIP_REASONS entry saying why it is unusable."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return "invalid_json"
    if not isinstance(obj, dict):
        return "not_an_object"
    if "question" not in obj or "answer" not in obj:
        return "missing_field"
    question, answer, answer_type = obj["question"], obj["answer"], obj.get("type")
    if isinstance(answer, int | float) and not isinstance(answer, bool) and math.isfinite(answer):
        answer = str(answer)
    if not isinstance(question, str) or not isinstance(answer, str):
        return "wrong_type"
    if answer_type is not None and not isinstance(answer_type, str):
        return "wrong_type"
    question, answer = question.strip(), answer.strip()
    if not question or not answer:
        return "empty_field"
    if obj.get("choices") is None:
        if answer_type == "mcq" or (answer_type is not None and answer_type not in ANSWER_TYPES):
            return "bad_type"
        return EvalRecord(question, answer, answer_type, None, line)
    if answer_type not in (None, "mcq"):
        return "bad_type"
    choices = _parse_choices(obj["choices"])
    if choices is None:
        return "bad_choices"
    letter = _choice_letter(answer, choices)
    if letter is None:
        return "answer_not_in_choices"
    return EvalRecord(question, letter, "mcq", choices, line)


def _parse_choices(value: object) -> tuple[str, ...] | None:
    if isinstance(value, dict):
        by_letter = {k.strip().upper(): v for k, v in value.items() if isinstance(k, str)}
        if len(value) != 4 or sorted(by_letter) != list(_LETTERS):
            return None
        value = [by_letter[k] for k in _LETTERS]
    if not isinstance(value, list) or len(value) != 4:
        return None
    if not all(isinstance(c, str) and c.strip() for c in value):
        return None
    return tuple(c.strip() for c in value)


def _choice_letter(answer: str, choices: tuple[str, ...]) -> str | None:
    letter = _LETTER.match(answer)
    if letter is not None:
        return letter.group(1).upper()
    hits = [i for i, c in enumerate(choices) if c == answer]
    if not hits:  # the text of a choice, up to case and spacing
        norm = lambda text: " ".join(text.split()).casefold()
        hits = [i for i, c in enumerate(choices) if norm(c) == norm(answer)]
    return _LETTERS[hits[0]] if len(hits) == 1 else None


# ---- prompts, generation, scoring ----


def encode_prompt(tokenizer: Any, record: EvalRecord) -> list[int]:
    """Token ids of the reasoner prompt: the chat template already holds the special tokens, so they
    are not added again (a BOS would be doubled on Llama tokenizers); plain prompts get them."""
    options = list(record.choices) if record.choices else None
    return encode(tokenizer, reasoner_prompt(record.question, options))


def evaluate(
    model: Any,
    tokenizer: Any,
    records: list[EvalRecord],
    *,
    max_tokens: int = 512,
    temperature: float = 0.0,
    seed: int = 0,
    max_num_seqs: int = 256,
    max_model_len: int = 4096,
    kv_cache_gb: float | None = None,
    engine: Any = None,
    progress: bool = True,
) -> EvalResult:
    """One completion per record, scored by ``score``. Pass ``engine`` (a ``spice_fast.engine.Engine``
    over ``model``) to reuse its KV pool, e.g. from a trainer; the engine arguments are then unused.
    A record whose prompt does not fit ``max_model_len`` is wrong with finish reason "prompt_too_long"."""
    from spice_fast.engine import Engine, SamplingParams  # torch: imported on use

    if tokenizer is None:
        raise ValueError("tokenizer is None: evaluation needs one to build the prompts")
    if not records:
        raise ValueError("records is empty: nothing to evaluate")
    if engine is None:
        engine = Engine(
            model, tokenizer, max_num_seqs=max(1, min(max_num_seqs, len(records))),
            max_model_len=max_model_len, kv_cache_gb=kv_cache_gb,
        )  # fmt: skip
    elif engine.model is not model:
        raise ValueError("engine: it runs a different model than the one passed to evaluate")
    params = SamplingParams(n=1, temperature=temperature, max_tokens=max_tokens, seed=seed)
    encoded = [encode_prompt(tokenizer, r) for r in records]
    fits = [i for i, ids in enumerate(encoded) if len(ids) < engine.max_model_len]
    if len(fits) < len(records):
        logger.warning(
            "%d of %d prompts have max_model_len=%d tokens or more; they count as wrong (%s)",
            len(records) - len(fits), len(records), engine.max_model_len, TOO_LONG,
        )  # fmt: skip
    responses, finish_reasons = [""] * len(records), [TOO_LONG] * len(records)
    t0 = time.perf_counter()
    outputs = engine.generate([encoded[i] for i in fits], params, progress=progress) if fits else []
    elapsed = time.perf_counter() - t0
    for i, out in zip(fits, outputs, strict=True):
        responses[i], finish_reasons[i] = out.outputs[0].text, out.outputs[0].finish_reason
    num_tokens = engine.stats.num_generated_tokens if fits else 0
    return score(records, responses, finish_reasons, num_generated_tokens=num_tokens, elapsed_s=elapsed)


def score(
    records: list[EvalRecord],
    responses: list[str],
    finish_reasons: list[str] | None = None,
    *,
    num_generated_tokens: int = 0,
    elapsed_s: float = 0.0,
) -> EvalResult:
    """Judge responses against their records with the reasoner reward (a boxed, matching answer)."""
    from spice_fast.spice.rewards import reasoner_rewards  # torch: imported on use

    if finish_reasons is None:
        finish_reasons = ["stop"] * len(records)
    if not len(records) == len(responses) == len(finish_reasons):
        raise ValueError(
            f"records, responses and finish_reasons differ in length: {len(records)}, {len(responses)}, "
            f"{len(finish_reasons)}"
        )
    rewards = reasoner_rewards(responses, [r.answer for r in records], [r.answer_type for r in records])
    judged = zip(records, responses, finish_reasons, rewards, strict=True)
    predictions = [_prediction(i, *item) for i, item in enumerate(judged)]
    return EvalResult(predictions, num_generated_tokens, elapsed_s)


def _prediction(index: int, record: EvalRecord, response: str, finish_reason: str, reward: float):
    return Prediction(
        index=index,
        line=record.line,
        question=record.question,
        choices=list(record.choices) if record.choices else None,
        gold=record.answer,
        type=record.answer_type,
        response=response,
        extracted=match.extract_answer(response),
        correct=reward > 0,
        finish_reason=finish_reason,
    )


# ---- outputs and the command ----


def default_predictions_path(data_path: str | os.PathLike) -> Path:
    """``<data dir>/<stem>.predictions.jsonl``."""
    data_path = Path(data_path)
    return data_path.with_name(f"{data_path.stem}.predictions.jsonl")


def write_predictions(path: str | os.PathLike, predictions: list[Prediction]) -> Path:
    """One JSON line per prediction, written beside the target and renamed over it (never half written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for p in predictions:
                f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def format_table(result: EvalResult) -> str:
    rows = [f"{'type':<12}{'count':>8}{'correct':>9}{'accuracy':>10}"]
    for key, s in result.per_type.items():
        rows.append(f"{key:<12}{s['count']:>8}{s['num_correct']:>9}{s['accuracy']:>10.1%}")
    rows.append(f"{'all':<12}{result.num_records:>8}{result.num_correct:>9}{result.accuracy:>10.1%}")
    return "\n".join(rows)


def cmd_eval(args: argparse.Namespace) -> int:
    """``spice-fast eval``: read, generate, score, write the predictions, print a table and a JSON line."""
    from spice_fast import load

    records, skipped = read_eval_data(args.data)
    records = records[: args.limit] if args.limit else records
    out = Path(args.out) if args.out else default_predictions_path(args.data)
    if not out.parent.is_dir():
        raise ValueError(f"--out: folder {str(out.parent)!r} does not exist")
    t0 = time.perf_counter()
    model, tokenizer = load(args.model, dtype=args.dtype, device=args.device)
    if tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer, so questions cannot be encoded")
    seconds = time.perf_counter() - t0
    print(f"loaded {args.model} in {seconds:.1f}s; {len(records)} questions", file=sys.stderr)
    result = evaluate(
        model, tokenizer, records, max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
        max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb, progress=not args.no_progress,
    )  # fmt: skip
    write_predictions(out, result.predictions)
    print(format_table(result))
    summary = {"model": args.model, "data": str(args.data), "predictions": str(out), **result.summary()}
    print(json.dumps({**summary, "num_skipped_lines": skipped}))
    return 0
