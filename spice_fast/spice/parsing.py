"""Strict parsing of challenger output into a task, or an invalid reason that is counted.

The challenger replies with tagged fields (see ``prompts``)::

    <question>...</question>
    <options>A) ... B) ... C) ... D) ...</options>     (multiple choice only, one option a line)
    <answer>...</answer>

A JSON object ``{"question": ..., "options": [...] or {"A": ...}, "answer": ...}`` is accepted too.
Every failure is one of ``INVALID_REASONS`` (the validity rules of ../shared/SPICE.md, plus
``copied_example``: the question of the prompt's own format example), never an
exception: model output is untrusted input of any shape and size.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from spice_fast import match
from spice_fast.spice.prompts import ANSWER_TYPES, copied_questions, normalize_question

INVALID_REASONS = (
    "unparseable",  # no tagged fields or JSON object, or a field given twice
    "empty_field",  # question or answer empty
    "wrong_type",  # the answer is not of its declared type (the matcher cannot read it as such)
    "bad_options",  # multiple choice without exactly four options A-D, or an empty option
    "gold_not_in_options",  # multiple-choice gold is not one of A-D
    "too_long",  # question over the length limit
    "copied_example",  # the question is the prompt's format example or placeholder, not from the document
)
_MAX_INPUT_CHARS = 100_000  # longer output is judged on its last part only (bounded work)
_TAG = {
    name: re.compile(rf"<{name}>(.*?)</{name}>", re.DOTALL | re.IGNORECASE)
    for name in ("question", "options", "answer")
}
_COPIED = copied_questions()
_OPTION = re.compile(r"^\s*\(?([A-Za-z])\s*[).:\]]\s*(.*?)\s*$")
_LETTER = re.compile(r"^\s*\(?\s*([A-Za-z])\s*(?:[).:\]].*)?$", re.DOTALL)


@dataclass(frozen=True)
class Task:
    question: str
    answer: str  # gold answer; a letter A-D for multiple choice
    answer_type: str  # one of ANSWER_TYPES
    options: tuple[str, ...] | None = None  # the four option texts, multiple choice only


@dataclass(frozen=True)
class Invalid:
    reason: str  # one of INVALID_REASONS
    detail: str = ""


def parse_challenger(text: str, answer_type: str, *, max_question_chars: int = 2000) -> Task | Invalid:
    """Parse one challenger response for the answer type it was asked to produce."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    if not isinstance(text, str):
        return Invalid("unparseable", f"not text: {type(text).__name__}")
    text = text[-_MAX_INPUT_CHARS:]
    fields = _tagged_fields(text)
    if fields is None:
        fields = _json_fields(text)
    if isinstance(fields, Invalid):
        return fields
    question, options, answer = fields
    question, answer = question.strip(), answer.strip()
    if not question or not answer:
        return Invalid("empty_field", "question" if not question else "answer")
    if len(question) > max_question_chars:
        return Invalid("too_long", f"{len(question)} > {max_question_chars} characters")
    if normalize_question(question) in _COPIED:
        return Invalid("copied_example", question[:60])
    if answer_type == "mcq":
        if options is None:
            return Invalid("bad_options", "no options")
        parsed = _parse_options(options)
        if isinstance(parsed, Invalid):
            return parsed
        letter = _LETTER.match(answer)
        if letter is None or letter.group(1).upper() not in "ABCD":
            return Invalid("gold_not_in_options", f"answer {answer[:40]!r}")
        return Task(question, letter.group(1).upper(), "mcq", parsed)
    ok, reason = match.parse_answer(answer, answer_type)
    if not ok:
        return Invalid("wrong_type", reason)
    return Task(question, answer, answer_type)


def _tagged_fields(text: str):
    found = {name: pattern.findall(text) for name, pattern in _TAG.items()}
    if not found["question"] and not found["answer"]:
        return None
    if len(found["question"]) != 1 or len(found["answer"]) != 1 or len(found["options"]) > 1:
        counts = {k: len(v) for k, v in found.items()}
        return Invalid("unparseable", f"tag counts {counts}")
    options = found["options"][0].strip().splitlines() if found["options"] else None
    return found["question"][0], options, found["answer"][0]


def _json_fields(text: str):
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return Invalid("unparseable", "no tagged fields or JSON object")
    try:
        obj = json.loads(text[start : end + 1])
    except (ValueError, RecursionError) as e:
        return Invalid("unparseable", f"invalid JSON: {type(e).__name__}")
    if not isinstance(obj, dict):
        return Invalid("unparseable", "JSON is not an object")
    question, answer, options = obj.get("question"), obj.get("answer"), obj.get("options")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(question, str) or not isinstance(answer, str):
        return Invalid("unparseable", "question and answer must be strings")
    if isinstance(options, dict):
        options = [f"{k}) {v}" for k, v in options.items() if isinstance(k, str) and isinstance(v, str)]
    elif isinstance(options, list):
        options = [
            f"{'ABCDEFGH'[i] if i < 8 else '?'}) {v}" for i, v in enumerate(options) if isinstance(v, str)
        ]
    else:
        options = None
    return question, options, answer


def _parse_options(lines: list[str]) -> tuple[str, ...] | Invalid:
    options: dict[str, str] = {}
    for line in lines:
        if not line.strip():
            continue
        m = _OPTION.match(line)
        if m is None:
            return Invalid("bad_options", f"not an option line: {line[:40]!r}")
        letter = m.group(1).upper()
        if letter in options:
            return Invalid("bad_options", f"option {letter} given twice")
        options[letter] = m.group(2)
    if sorted(options) != ["A", "B", "C", "D"]:
        return Invalid("bad_options", f"options {sorted(options)}, need exactly A-D")
    if any(not options[k] for k in "ABCD"):
        return Invalid("bad_options", "an empty option")
    return tuple(options[k] for k in "ABCD")
