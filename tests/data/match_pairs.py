"""Generated (pred, gold, kind) answer pairs for the differential test against math-verify and for
benches/bench_match.py: numbers in many spellings, fractions, expressions, radicals, sets, intervals,
tuples, multiple choice and equations, about half of them wrong on purpose. Deterministic per seed."""

from __future__ import annotations

import random
from fractions import Fraction
from math import gcd


def _thousands(n: int) -> str:
    return f"{n:,}"


def _frac(q: Fraction, style: int) -> str:
    a, b = q.numerator, q.denominator
    sign = "-" if a < 0 else ""
    a = abs(a)
    if b == 1:
        return f"{sign}{a}"
    return [
        f"{sign}\\frac{{{a}}}{{{b}}}",
        f"{sign}\\dfrac{{{a}}}{{{b}}}",
        f"{sign}{a}/{b}",
        f"{sign}\\tfrac{{{a}}}{{{b}}}",
    ][style % 4]


def _terminating(q: Fraction) -> str | None:
    b = q.denominator
    while b % 2 == 0:
        b //= 2
    while b % 5 == 0:
        b //= 5
    if b != 1:
        return None
    text = f"{float(q):.10f}".rstrip("0").rstrip(".")
    return text if Fraction(text) == q else None


def _integer(rng: random.Random) -> tuple[str, str, bool]:
    n = rng.choice([rng.randint(-20, 20), rng.randint(-(10**4), 10**4), rng.randint(1000, 10**7)])
    gold = str(n)
    if rng.random() < 0.5:
        spellings = [str(n), f"{n}.0", f"\\frac{{{2 * n}}}{{2}}", f"${n}$", f"{n}\\text{{ units}}"]
        spellings.append(f"x = {n}")
        if abs(n) >= 1000:
            spellings.append(_thousands(n))
        return rng.choice(spellings), gold, True
    wrong = rng.choice([n + 1, n - 1, -n if n else 7, n * 10, n + 100])
    return str(wrong), gold, False


def _fraction(rng: random.Random) -> tuple[str, str, bool]:
    b = rng.randint(2, 40)
    a = rng.randint(-60, 60)
    while a == 0 or gcd(a, b) != 1:
        a = rng.randint(-60, 60)
    q = Fraction(a, b)
    gold = _frac(q, rng.randint(0, 3))
    if rng.random() < 0.5:
        k = rng.randint(2, 5)
        options = [_frac(q, rng.randint(0, 3)), f"\\frac{{{q.numerator * k}}}{{{q.denominator * k}}}"]
        dec = _terminating(q)
        if dec is not None:
            options.append(dec)
        if q > 1 and q.denominator > 1:
            whole, rest = divmod(q.numerator, q.denominator)
            options.append(f"{whole}\\frac{{{rest}}}{{{q.denominator}}}")
        return rng.choice(options), gold, True
    wrong = rng.choice([q + 1, q * 2, Fraction(q.denominator, q.numerator), -q, q + Fraction(1, 1000)])
    return _frac(wrong, rng.randint(0, 3)), gold, False


def _decimal(rng: random.Random) -> tuple[str, str, bool]:
    q = Fraction(rng.randint(-99999, 99999), 10 ** rng.randint(1, 4))
    gold = _terminating(q) or "0"
    if rng.random() < 0.5:
        options = [gold + "0" if "." in gold else gold + ".0", _frac(q, rng.randint(0, 3)), gold]
        return rng.choice(options), gold, True
    return _terminating(q + Fraction(1, 10 ** rng.randint(1, 3))) or "1", gold, False


def _poly(coeffs: list[int], var: str = "x") -> str:
    terms = []
    degree = len(coeffs) - 1
    for i, c in enumerate(coeffs):
        p = degree - i
        if c == 0:
            continue
        mono = "" if p == 0 else (var if p == 1 else f"{var}^{{{p}}}")
        coef = str(abs(c)) if (abs(c) != 1 or p == 0) else ""
        terms.append(("-" if c < 0 else "+") + coef + mono)
    text = "".join(terms) or "0"
    return text[1:] if text.startswith("+") else text


def _expression(rng: random.Random) -> tuple[str, str, bool]:
    p, q = rng.randint(-9, 9), rng.randint(-9, 9)
    kind = rng.randint(0, 3)
    if kind == 0:  # linear, commuted
        a = rng.choice([2, 3, 5, -2, 7])
        gold = _poly([a, p])
        right = [f"{p}+{a}x" if p else f"{a}x", f"x\\cdot {a}+{p}" if p else f"x\\cdot {a}", f"{a}*x+{p}"]
        wrong = _poly([a, p + 1])
    elif kind == 1:  # factored vs expanded
        gold = _poly([1, p + q, p * q])
        right = [f"(x{p:+d})(x{q:+d})", f"(x{q:+d})(x{p:+d})"]
        wrong = f"(x{p:+d})(x{q + 1:+d})"
    elif kind == 2:  # squares
        gold = f"(x{p:+d})^2"
        right = [_poly([1, 2 * p, p * p]), f"(x{p:+d})^{{2}}"]
        wrong = _poly([1, 2 * p, p * p + 1])
    else:  # rational expression
        gold = f"\\frac{{x{p:+d}}}{{{abs(q) + 2}}}"
        right = [f"(x{p:+d})/{abs(q) + 2}", f"\\frac{{1}}{{{abs(q) + 2}}}(x{p:+d})"]
        wrong = f"\\frac{{x{p + 1:+d}}}{{{abs(q) + 2}}}"
    if rng.random() < 0.5:
        return rng.choice(right), gold, True
    return wrong, gold, False


def _radical(rng: random.Random) -> tuple[str, str, bool]:
    k = rng.choice([2, 3, 5, 6, 7])
    m = rng.randint(2, 9)
    kind = rng.randint(0, 2)
    if kind == 0:
        gold, right = f"\\frac{{\\sqrt{{{k}}}}}{{{k}}}", f"1/\\sqrt{{{k}}}"
        wrong = f"\\frac{{\\sqrt{{{k}}}}}{{{k + 1}}}"
    elif kind == 1:
        gold, right, wrong = f"{m}\\sqrt{{{k}}}", f"\\sqrt{{{m * m * k}}}", f"{m + 1}\\sqrt{{{k}}}"
    else:
        gold, right = f"\\frac{{{m}\\pi}}{{{k}}}", f"\\frac{{{m}}}{{{k}}}\\pi"
        wrong = f"\\frac{{{m + 1}\\pi}}{{{k}}}"
    return (right, gold, True) if rng.random() < 0.5 else (wrong, gold, False)


def _set(rng: random.Random) -> tuple[str, str, bool]:
    items = rng.sample(range(-20, 30), rng.randint(2, 4))
    gold = "\\{" + ",".join(map(str, items)) + "\\}"
    shuffled = items[:]
    rng.shuffle(shuffled)
    if rng.random() < 0.5:
        return "\\{" + ", ".join(map(str, shuffled)) + "\\}", gold, True
    shuffled[0] += 1
    while shuffled[0] in items:
        shuffled[0] += 1
    return "\\{" + ", ".join(map(str, shuffled)) + "\\}", gold, False


def _interval(rng: random.Random) -> tuple[str, str, bool]:
    a = rng.randint(-10, 5)
    b = a + rng.randint(1, 10)
    left, right = rng.choice("(["), rng.choice(")]")
    gold = f"{left}{a},{b}{right}"
    if rng.random() < 0.5:
        return f"{left}{a}, {b}{right}", gold, True
    flip = {"(": "[", "[": "("}
    return f"{flip[left]}{a},{b}{right}", gold, False


def _tuple(rng: random.Random) -> tuple[str, str, bool]:
    a, b = rng.randint(-9, 9), rng.randint(-9, 9)
    while b == a:
        b = rng.randint(-9, 9)
    gold = f"({a},{b})"
    if rng.random() < 0.5:
        return f"\\left({a}, {b}\\right)", gold, True
    return f"({b},{a})", gold, False


def _mcq(rng: random.Random) -> tuple[str, str, bool]:
    gold = rng.choice("ABCD")
    letter = gold if rng.random() < 0.5 else rng.choice([c for c in "ABCD" if c != gold])
    pred = rng.choice([letter, f"({letter})", f"\\text{{{letter}}}", f"The answer is {letter}"])
    return pred, gold, letter == gold


def _pi_decimal(rng: random.Random) -> tuple[str, str, bool]:
    return rng.choice(["3.14", "3.1416", "22/7"]), "\\pi", False


def _tiny(rng: random.Random) -> tuple[str, str, bool]:
    # Values that underflow floating point; equal only when exactly equal.
    n = rng.randint(60, 120)
    f = rng.randint(1990, 2010)
    return rng.choice(
        [
            (f"1/2^{{{n}}}", f"1/2^{{{n + 1}}}", False),
            (f"\\frac{{1}}{{{f}!}}", f"\\frac{{1}}{{{f + 2}!}}", False),
            (f"2^{{-{n}}}", f"\\frac{{1}}{{2^{{{n}}}}}", True),
        ]
    )


def _rounded(rng: random.Random) -> tuple[str, str, bool]:
    # A rounded decimal against an exact non-terminating fraction: not equal.
    b = rng.choice([3, 7, 9, 11, 13])
    a = rng.randint(1, b - 1)
    return f"{a / b:.6f}", f"\\frac{{{a}}}{{{b}}}", False


GENERATORS = {
    "integer": _integer,
    "fraction": _fraction,
    "decimal": _decimal,
    "expression": _expression,
    "radical": _radical,
    "set": _set,
    "interval": _interval,
    "tuple": _tuple,
    "mcq": _mcq,
    "pi_decimal": _pi_decimal,
    "tiny": _tiny,
    "rounded": _rounded,
}
WEIGHTS = {"pi_decimal": 0.1, "tiny": 0.05, "rounded": 0.02}


def make_pairs(num_pairs: int, seed: int = 0) -> list[tuple[str, str, str, bool]]:
    """(pred, gold, kind, intended): pred is a bare answer or, one time in three, a response with a box."""
    rng = random.Random(seed)
    kinds = list(GENERATORS)
    weights = [WEIGHTS.get(k, 1.0) for k in kinds]
    out = []
    for _ in range(num_pairs):
        kind = rng.choices(kinds, weights)[0]
        pred, gold, intended = GENERATORS[kind](rng)
        if rng.random() < 1 / 3:
            pred = f"Let us work it out step by step.\nSo the final answer is $\\boxed{{{pred}}}$."
        out.append((pred, gold, kind, intended))
    return out
