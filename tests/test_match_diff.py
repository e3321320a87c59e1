"""Differential test: spice_fast.match.verify against Hugging Face math-verify on generated pairs.

Both checkers judge the same 3,000 (pred, gold) pairs from tests/data/match_pairs.py; they must agree
on at least 98% of them, and every disagreement must fall in a class of
tests/data/match_disagreements.py, where each class is justified. math-verify runs in a small
process pool (it is slow, tens of ms per pair) and is skipped when not installed.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))

from match_disagreements import CLASSES, classify  # noqa: E402
from match_pairs import make_pairs  # noqa: E402

from spice_fast.match import verify_batch  # noqa: E402

NUM_PAIRS = 3000
SEED = 0


def math_verify_judge(pred: str, gold: str) -> bool:
    """How math-verify is used in trainers: gold in $...$, responses as they are, bare answers in $...$."""
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$")
    pred_text = pred if ("\\boxed" in pred or "answer is" in pred) else f"${pred}$"
    return bool(verify(gold_parsed, parse(pred_text)))


def _judge_chunk(chunk: list[tuple[str, str]]) -> list[bool]:
    return [math_verify_judge(p, g) for p, g in chunk]


def math_verify_all(pairs: list[tuple[str, str]]) -> list[bool]:
    workers = max(1, min(2, os.cpu_count() or 1))
    chunks = [pairs[i : i + 100] for i in range(0, len(pairs), 100)]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return [r for part in pool.map(_judge_chunk, chunks) for r in part]


def test_agreement_with_math_verify():
    pytest.importorskip("math_verify")
    cases = make_pairs(NUM_PAIRS, SEED)
    pairs = [(p, g) for p, g, _, _ in cases]
    ours = verify_batch([p for p, _ in pairs], [g for _, g in pairs])
    theirs = math_verify_all(pairs)

    unexplained, classes = [], Counter()
    for (pred, gold, kind, _intended), a, b in zip(cases, ours, theirs, strict=True):
        if a == b:
            continue
        name = classify(pred, gold, kind, ours=a, theirs=b)
        if name is None:
            unexplained.append((kind, pred[-60:], gold, a, b))
        else:
            classes[name] += 1
    agreement = 1 - (sum(classes.values()) + len(unexplained)) / len(cases)
    print(f"agreement {agreement:.4f} over {len(cases)} pairs; disagreement classes {dict(classes)}")
    assert not unexplained, f"disagreements in no listed class: {unexplained[:10]}"
    assert agreement >= 0.98, f"agreement {agreement:.4f} < 0.98 ({dict(classes)})"
    assert set(classes) <= set(CLASSES)


def test_intended_labels():
    """Our verdicts equal the generator's intended labels on every pair (math-verify not needed)."""
    cases = make_pairs(NUM_PAIRS, SEED)
    ours = verify_batch([p for p, _, _, _ in cases], [g for _, g, _, _ in cases])
    wrong = [(k, p[-60:], g, i) for (p, g, k, i), a in zip(cases, ours, strict=True) if a != i]
    assert not wrong, wrong[:10]
