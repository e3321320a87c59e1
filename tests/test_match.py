"""Unit tests of spice_fast.match: one group per rule of the matcher's specification (issue 5),
positive and negative cases, the public API's argument errors and batch/thread equivalence."""

from __future__ import annotations

import pytest

from spice_fast.match import extract_answer, parse_answer, reward_fn, verify, verify_batch


def both(pairs: list[tuple[str, str]], expected: bool, answer_type: str | None = None) -> None:
    wrong = [(p, g) for p, g in pairs if verify(p, g, answer_type=answer_type) is not expected]
    assert not wrong, f"expected {expected} for {wrong}"


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"so \boxed{42}.", "42"),
        (r"\boxed{1} then \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
        (r"\fbox{7}", "7"),
        (r"nested \boxed{\sqrt{\frac{a}{b}}} end", r"\sqrt{\frac{a}{b}}"),
        (r"\boxed{3} and an unclosed \boxed{4", "3"),
        ("The answer is 12.", "12"),
        ("Thus the final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Answer: B", "B"),
        ("work\n#### 72", "72"),
        ("so the result is **17**", "17"),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_extract_answer_bytes_and_invalid_utf8():
    assert extract_answer(b"\\boxed{5}\xff\xfe") == "5"
    assert extract_answer(b"\\boxed{\xff}") == "\ufffd"


# ---------------------------------------------------------------- numbers


def test_numbers_equal():
    both(
        [
            ("42", "42"),
            ("-7", "-7"),
            ("+3", "3"),
            ("1,000", "1000"),
            ("1,234,567.5", "1234567.5"),
            ("1{,}000", "1000"),
            ("2.50", "2.5"),
            ("1.5e3", "1500"),
            ("2E-2", "0.02"),
            ("1/2", "0.5"),
            (r"\frac{1}{2}", "0.5"),
            (r"\dfrac{3}{4}", "0.75"),
            (r"\tfrac{3}{4}", "3/4"),
            (r"\frac12", "0.5"),
            (r"2\frac{1}{2}", "5/2"),
            (r"-2\frac{1}{2}", "-2.5"),
            (r"\frac{6}{4}", r"\frac{3}{2}"),
            ("0.1", "1/10"),
            ("1.5\\times10^{3}", "1500"),
        ],
        True,
    )


def test_numbers_not_equal():
    both(
        [
            ("0,1", "01"),
            ("0,1", "1"),
            ("1,00", "100"),
            ("42", "43"),
            ("-7", "7"),
            ("0.333333", "1/3"),
            ("0.5", "0.50001"),
            (r"2\frac{1}{2}", "1"),
            ("1/2004!", "1/2006!"),
            ("1/2^{99}", "1/2^{98}"),
            ("3.14", r"\pi"),
            ("2^{100}+1", "2^{100}"),
        ],
        False,
    )


def test_exact_rationals_beyond_double_precision():
    both([("2^{200}", "1606938044258990275541962092341162602522202993782792835301376")], True)
    both([("2^{200}", "1606938044258990275541962092341162602522202993782792835301377")], False)
    both([("1/2006!", "1/2006!"), ("2006!/2004!", "2006\\cdot2005")], True)


def test_relative_tolerance_for_irrationals():
    both([("1.4142136", r"\sqrt{2}"), ("3.14159265", r"\pi"), ("0.7071068", r"\frac{\sqrt{2}}{2}")], True)
    both([("1.4142", r"\sqrt{2}"), ("3.1416", r"\pi")], False)


def test_rounding_noise_is_zero_but_tiny_values_are_not():
    both(
        [(r"\sin(\pi)", "0"), (r"\sqrt{2}\cdot\sqrt{2}-2", "0"), (r"\cos(\pi/2)", "0"), (r"\tan(\pi)", "0")],
        True,
    )
    both([(r"\pi/10^{20}", "0"), (r"\sqrt{2}\cdot 10^{-30}", "0"), (r"\sin(10^{-20})", "0")], False)


def test_percent():
    both([("50\\%", "50\\%"), ("50", "50\\%"), ("0.5", "50\\%"), ("50%", "50\\%")], True)
    both([("51", "50\\%"), ("0.51", "50\\%")], False)


# ---------------------------------------------------------------- expressions


def test_expressions_equal():
    both(
        [
            ("x+1", "1+x"),
            ("2x", r"x\cdot 2"),
            ("2x", r"x \times 2"),
            ("2*x", "2x"),
            (r"\frac{\sqrt{2}}{2}", r"\sqrt{2}/2"),
            (r"\sqrt{2}/2", r"1/\sqrt{2}"),
            (r"\sqrt{8}", r"2\sqrt{2}"),
            ("x^2+2x+1", "(x+1)^2"),
            ("(a+b)^2", "a^2+2ab+b^2"),
            (r"\sin^2 x + \cos^2 x", "1"),
            (r"\frac{x^2-1}{x-1}", "x+1"),
            (r"2\pi", r"\pi\cdot 2"),
            (r"\sqrt[3]{8}", "2"),
            (r"\log_2 8", "3"),
            (r"\ln(e^2)", "2"),
            (r"|-3|", "3"),
            (r"\binom{5}{2}", "10"),
            ("5!", "120"),
        ],
        True,
    )


def test_expressions_not_equal():
    both(
        [
            ("x+1", "x+2"),
            ("2x", "x^2"),
            ("x^2+2x+1", "(x-1)^2"),
            ("|x|", "x"),
            (r"\sqrt{2}", r"\sqrt{3}"),
            ("a-b", "b-a"),
            (r"\pi", "3"),
        ],
        False,
    )


def test_equation_against_bare_value():
    both([("x = 5", "5"), ("x=\\frac{1}{2}", "0.5"), ("5", "x = 5")], True)
    both([("x = 6", "5"), ("3 x^2", "3"), ("2 x", "2")], False)


def test_equations():
    both([("y = 2x + 1", "y = 1 + 2x"), ("y=2x+1", "2x+1=y"), ("2x+2y=2", "x+y=1")], True)
    both([("y = 2x + 1", "y = 2x + 2"), ("x + y = 1", "x - y = 1"), ("x=1", "x<1")], False)
    both([("y = x + 10^{5000}", "y = x + 10^{5001}"), ("x^{2} = 4", "x = 2")], False)


def test_inequalities():
    both([("x < 3", "3 > x"), (r"x \le 2", "x <= 2"), (r"x \geq 1", "1 \\le x")], True)
    both([("x < 3", "x <= 3"), ("x < 3", "x > 3")], False)


# ---------------------------------------------------------------- structures


def test_plus_minus_is_a_set_of_two():
    both([(r"2 \pm \sqrt{3}", r"\{2+\sqrt{3}, 2-\sqrt{3}\}"), (r"1 \pm 2", "3, -1")], True)
    both([(r"x = 1 \pm 2", r"-1, 3")], True)
    both([(r"2 \pm \sqrt{3}", r"2+\sqrt{3}"), (r"1 \pm 2", "3, 1")], False)


def test_tuples_and_points():
    both([("(1, 2)", "(1,2)"), (r"\left(1,\frac{1}{2}\right)", "(1, 0.5)"), ("1, 2", "(1, 2)")], True)
    both([("(2, 1)", "(1, 2)"), ("(1, 2, 3)", "(1, 2)")], False)


def test_sets_are_order_free():
    both([(r"\{1,2\}", r"\{2,1\}"), (r"\{1, 2, 3\}", r"\{3, 1, 2\}"), ("2, 1", r"\{1,2\}")], True)
    both([("3, 1, 2", "1, 2, 3")], True)
    both([(r"\{1,2\}", r"\{1,3\}"), (r"\{1\}", r"\{1,2\}")], False)


def test_intervals_bracket_types_matter():
    both([("[1, 2)", "[1,2)"), (r"(-\infty, 3]", r"(-\infty,3]"), (r"(0,\infty)", r"(0, \infty)")], True)
    both([("(1,2]", "(1,2)"), ("[1,2]", "[1,2)"), ("[1,2]", "(1,2]")], False)
    both([(r"(-\infty,1)\cup(2,\infty)", r"(2,\infty)\cup(-\infty,1)")], True)
    both([(r"(-\infty,1)\cup(2,\infty)", r"(-\infty,1]\cup(2,\infty)")], False)


# ---------------------------------------------------------------- noise


def test_noise_is_ignored():
    both(
        [
            (r"\left( 3 \right)", "3"),
            (r"3\!", "3"),
            (r"1\,000", "1000"),
            ("$5$", "5"),
            (r"5\text{ cm}", "5"),
            (r"5 \text{ apples}", "5"),
            (r"\text{12}", "12"),
            ("5 cm", "5"),
            ("12 apples", "12"),
            ("3 cm^2", "3"),
            (r"3 \text{ and } 4", r"\{3, 4\}"),
            (r"30^\circ", "30"),
            (r"30^{\circ}", "30"),
            ("12.", "12"),
            (r"\mathrm{e}^2", "e^2"),
            (r"\displaystyle\frac{1}{2}", "0.5"),
            ("\u221212", "-12"),
            ("3\u00b7x", "3x"),
        ],
        True,
    )


# ---------------------------------------------------------------- multiple choice


def test_mcq_spellings():
    pairs = [
        ("B", "B"),
        ("(B)", "B"),
        ("B)", "B"),
        (r"\boxed{B}", "B"),
        (r"\text{(B)}", "B"),
        ("The answer is B", "B"),
        ("The answer is (B).", "B"),
        ("option B", "B"),
        (r"Thinking... so \boxed{\text{(C)}}", "C"),
        ("(D) 42", "D"),
    ]
    both(pairs, True)
    both(pairs[:4], True, answer_type="mcq")


def test_mcq_negative_and_letters_never_match_numbers():
    both([("A", "B"), ("(C)", "B"), ("option A", "B"), ("2", "B"), ("B", "2"), ("b", "2")], False)
    both([("2", "B")], False, answer_type="mcq")


# ---------------------------------------------------------------- strings


def test_strings():
    both(
        [
            ("Paris", "paris"),
            ("  Paris. ", "Paris"),
            ("the Eiffel Tower", "Eiffel tower"),
            ("an apple", "Apple!"),
            (r"\text{Paris}", "Paris"),
        ],
        True,
    )
    both([("Paris", "London"), ("Paris France", "Paris"), ("", "Paris")], False)
    both([("yes", "Yes.")], True, answer_type="string")
    both([("no", "yes")], False, answer_type="string")


# ---------------------------------------------------------------- known false positives elsewhere


def test_known_false_positives_are_false():
    both([("1/2004!", "1/2006!"), ("1/2^{99}", "1/2^{98}"), ("3.14", r"\pi")], False)
    both([("x = 1", "x = 2"), ("y=x", "y=2x"), ("y = x + 1", "y = x - 1")], False)


def test_too_large_to_decide_is_not_equal():
    both([("5^{5^{5^{5^5}}}", "5^{5^{5^{5^5}}}+1"), ("10^{10^{10}}", "10^{10^{10}}+1")], False)
    both([("99999!", "99999!+1"), ("2^{40000}", "2^{40000}+1")], False)
    assert verify("5^{5^{5^{5^5}}}", "5") is False


# ---------------------------------------------------------------- full responses


def test_full_response_as_pred():
    response = "Let me think.\nWe get 2+2 = 4, so\n\\[\\boxed{4}\\]\nDone."
    assert verify(response, "4")
    assert not verify(response, "5")
    assert verify("Some reasoning\nThe answer is $\\frac{1}{2}$.", "0.5")
    assert not verify("no answer at all", "3")


# ---------------------------------------------------------------- parse_answer


@pytest.mark.parametrize(
    ("text", "answer_type", "ok"),
    [
        ("12", "integer", True),
        ("-1,000", "integer", True),
        ("2^{10}", "integer", True),
        ("1.5", "integer", False),
        ("x", "integer", False),
        ("", "integer", False),
        ("x^2+1", "expression", True),
        (r"\frac{1}{2}", "expression", True),
        ("x+", "expression", False),
        (r"\frac{1}{", "expression", False),
        ("B", "mcq", True),
        ("(C)", "mcq", True),
        ("E", "mcq", False),
        ("42", "mcq", False),
        ("Paris", "string", True),
        ("...", "string", False),
        ("7", None, True),
    ],
)
def test_parse_answer(text, answer_type, ok):
    got, reason = parse_answer(text, answer_type)
    assert got is ok, reason
    assert (reason == "") is ok


# ---------------------------------------------------------------- API


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="answer_type"):
        verify("1", "1", answer_type="number")
    with pytest.raises(TypeError, match="pred"):
        verify(1, "1")
    with pytest.raises(TypeError, match="gold"):
        verify("1", None)
    with pytest.raises(ValueError, match="golds"):
        verify_batch(["1", "2"], ["1"])
    with pytest.raises(ValueError, match="answer_types"):
        verify_batch(["1"], ["1"], ["integer", "integer"])
    with pytest.raises(ValueError, match=r"answer_types\[0\]"):
        verify_batch(["1"], ["1"], ["bogus"])
    with pytest.raises(TypeError, match=r"preds\[1\]"):
        verify_batch(["1", 2], ["1", "2"])
    with pytest.raises(TypeError, match="preds"):
        verify_batch("12", "12")
    with pytest.raises(ValueError, match="num_threads"):
        verify_batch(["1"], ["1"], num_threads=-1)
    with pytest.raises(ValueError, match="answer_type"):
        parse_answer("1", "float")


def test_batch_equals_single_calls_for_every_thread_count():
    preds = ["1/2", "x+1", "B", "Paris", r"\{1,2\}", "(1,2]", "7", "bad", "\\boxed{3}", "50"] * 37
    golds = ["0.5", "1+x", "B", "paris", r"\{2,1\}", "(1,2)", "8", "bad", "3", "50\\%"] * 37
    types = [None, "expression", "mcq", "string", None, None, "integer", None, None, None] * 37
    expected = [verify(p, g, answer_type=t) for p, g, t in zip(preds, golds, types, strict=True)]
    for threads in (0, 1, 2, 3, 16):
        assert verify_batch(preds, golds, types, num_threads=threads) == expected
    assert verify_batch([], []) == []


def test_surrogates_and_invalid_utf8_do_not_raise():
    assert verify("\udc80\ud800", "1") is False
    assert verify(b"\xff\xfe\x00", b"\x80") is False
    assert verify_batch([b"\xc3\x28", "\udcff"], ["1", b"\xff"]) == [False, False]


def test_reward_fn():
    completions = ["so \\boxed{4}", [{"role": "assistant", "content": "\\boxed{B}"}], "no idea"]
    assert reward_fn(completions, ["4", "B", "3"]) == [1.0, 1.0, 0.0]
    assert reward_fn(["\\boxed{4}"], ["4"], answer_type="integer", prompts=["p"]) == [1.0]
    assert reward_fn(prompts=["p"], completions=["\\boxed{7}"], answer=["7"]) == [1.0]
    assert reward_fn(["\\boxed{7}"], solution=["8"]) == [0.0]
    with pytest.raises(ValueError, match="answers"):
        reward_fn(["a"], ["a", "b"])
    with pytest.raises(TypeError, match="answers"):
        reward_fn(["a"])
    with pytest.raises(TypeError, match=r"completions\[0\]"):
        reward_fn([3], ["a"])
