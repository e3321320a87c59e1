"""Answer matching for SPICE rewards: the Python face of the C++ matcher ``spice_fast._matcher``.

``verify(pred, gold)`` decides whether a reasoner response (or a bare answer) matches the gold answer:
numbers in any common spelling compared exactly as rationals, expressions by canonical form or by
evaluation at shared random points, sets, tuples, intervals, equations, multiple choice and strings.
It plays the role of Hugging Face ``math-verify`` (the differential test compares the two) but never
calls ``eval``, uses no signals or subprocesses, and bounds its work on every input: an answer too
large to decide is "not equal". ``verify_batch`` releases the GIL and spreads pairs over threads.

Tests: ``pytest tests/test_match.py tests/test_match_diff.py tests/test_match_fuzz.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

from spice_fast import _matcher

ANSWER_TYPES: dict[str | None, int] = {None: 0, "mcq": 1, "integer": 2, "expression": 3, "string": 4}

Text = str | bytes


def _to_bytes(value: object, name: str) -> bytes:
    # UTF-8 with "surrogatepass" so lone surrogates from decoded model output never raise.
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise TypeError(f"{name}: expected str or bytes, got {type(value).__name__}")


def _type_code(answer_type: object, name: str) -> int:
    if answer_type is not None and not isinstance(answer_type, str):
        raise TypeError(f"{name}: expected one of {list(ANSWER_TYPES)}, got {type(answer_type).__name__}")
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"{name}: expected one of {list(ANSWER_TYPES)}, got {answer_type!r}")
    return ANSWER_TYPES[answer_type]


def _as_list(values: object, name: str) -> list:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name}: expected a list of str or bytes, got {type(values).__name__}")
    return list(values)


def extract_answer(text: Text) -> str | None:
    """The last ``\\boxed{...}`` / ``\\fbox{...}``; else "The answer is X", "Answer: X", "#### X" or a
    bold final answer; ``None`` when the text holds none of these."""
    out = _matcher.extract_answer(_to_bytes(text, "text"))
    return None if out is None else out.decode("utf-8", "replace")


def has_box(response: str) -> bool:
    """Whether a response holds a ``\\boxed{}`` / ``\\fbox{}`` answer (without one the SPICE reasoner
    reward is 0, whatever a looser extraction finds)."""
    return "\\boxed" in response or "\\fbox" in response


def verify(pred: Text, gold: Text, *, answer_type: str | None = None) -> bool:
    """Whether ``pred`` (a full response or a bare answer) matches ``gold``. ``answer_type``: "mcq",
    "integer", "expression", "string" or None (inferred from the gold answer)."""
    code = _type_code(answer_type, "answer_type")
    return _matcher.verify(_to_bytes(pred, "pred"), _to_bytes(gold, "gold"), code)


def verify_batch(
    preds: Sequence[Text],
    golds: Sequence[Text],
    answer_types: Sequence[str | None] | None = None,
    *,
    num_threads: int = 0,
) -> list[bool]:
    """``verify`` over pairs, GIL released, spread over ``num_threads`` threads (0 = all cores)."""
    preds, golds = _as_list(preds, "preds"), _as_list(golds, "golds")
    if len(preds) != len(golds):
        raise ValueError(f"golds: length {len(golds)} differs from preds length {len(preds)}")
    codes: list[int] = []
    if answer_types is not None:
        types = _as_list(answer_types, "answer_types")
        if len(types) != len(preds):
            raise ValueError(f"answer_types: length {len(types)} differs from preds length {len(preds)}")
        codes = [_type_code(t, f"answer_types[{i}]") for i, t in enumerate(types)]
    if not isinstance(num_threads, int) or isinstance(num_threads, bool) or num_threads < 0:
        raise ValueError(f"num_threads: expected an int >= 0, got {num_threads!r}")
    pred_bytes = [_to_bytes(p, f"preds[{i}]") for i, p in enumerate(preds)]
    gold_bytes = [_to_bytes(g, f"golds[{i}]") for i, g in enumerate(golds)]
    return _matcher.verify_batch(pred_bytes, gold_bytes, codes, num_threads)


def parse_answer(text: Text, answer_type: str | None) -> tuple[bool, str]:
    """``(ok, reason)``: whether a gold answer is well formed for its type (the challenger's validity
    check); ``reason`` says why not and is empty when ``ok``."""
    code = _type_code(answer_type, "answer_type")
    return _matcher.parse_answer(_to_bytes(text, "text"), code)


def _completion_text(completion: object, index: int) -> Text:
    # TRL passes plain strings or conversations (a list of {"role", "content"} messages).
    if isinstance(completion, str | bytes):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, str | bytes):
            return content
    got = type(completion).__name__
    raise TypeError(f"completions[{index}]: expected str, bytes or a list of messages, got {got}")


def reward_fn(
    completions: Sequence[object], answers: Sequence[Text] | None = None, **kwargs: object
) -> list[float]:
    """Reward function for other trainers (TRL style): 1.0 when a completion matches its answer, else 0.0.

    ``answers`` may also arrive as a dataset column named ``answer`` or ``solution`` (TRL passes
    columns as keywords). Optional keyword ``answer_types`` (a list) or ``answer_type`` (one for
    all); ``num_threads``. Other keyword arguments (prompts, ...) are ignored.
    """
    if answers is None:
        answers = kwargs.get("answer", kwargs.get("solution"))
        if answers is None:
            raise TypeError("answers: missing (pass answers=, or a dataset column 'answer' or 'solution')")
    completions = _as_list(completions, "completions")
    answers = _as_list(answers, "answers")
    if len(completions) != len(answers):
        raise ValueError(f"answers: length {len(answers)} differs from completions length {len(completions)}")
    answer_types = kwargs.get("answer_types")
    if answer_types is None and kwargs.get("answer_type") is not None:
        answer_types = [kwargs["answer_type"]] * len(completions)
    num_threads = kwargs.get("num_threads", 0)
    texts = [_completion_text(c, i) for i, c in enumerate(completions)]
    return [float(ok) for ok in verify_batch(texts, answers, answer_types, num_threads=num_threads)]


__all__ = ["ANSWER_TYPES", "extract_answer", "parse_answer", "reward_fn", "verify", "verify_batch"]
