"""Every class of disagreement between spice_fast.match and math-verify seen in the differential test
(tests/test_match_diff.py), with why spice_fast's verdict is the one we want. ``classify`` maps one
disagreeing pair to its class name, or None when it fits no class (the test then fails)."""

from __future__ import annotations

import re

CLASSES: dict[str, str] = {
    "mcq_phrase": (
        "Pred is 'The answer is B' (no box) for gold 'B'. The issue requires this spelling to match; "
        "math-verify extracts nothing from the sentence. We say True."
    ),
    "underflow_false_positive": (
        "1/2^{n} vs 1/2^{n+1}, 1/f! vs 1/(f+2)!: math-verify compares numerically and calls values below "
        "its precision equal. They are different rationals; the issue lists these as known false "
        "positives that must be False here. We compare rationals exactly."
    ),
    "rounded_decimal": (
        "A decimal rounded to 6 places vs an exact non-terminating fraction (0.333333 vs 1/3): math-verify "
        "rounds to 6 decimals and says True; the issue asks for exact comparison when both sides are "
        "rational. We say False."
    ),
}


def classify(pred: str, gold: str, kind: str, *, ours: bool, theirs: bool) -> str | None:
    if kind == "mcq" and ours and not theirs and "answer is" in pred:
        return "mcq_phrase"
    if kind == "tiny" and not ours and theirs:
        return "underflow_false_positive"
    if kind == "rounded" and not ours and theirs and re.search(r"\d\.\d{6}", pred):
        return "rounded_decimal"
    return None
