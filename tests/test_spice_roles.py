"""SPICE roles: prompts, strict challenger parsing with counted invalid reasons, rewards, advantages."""

import random

import pytest
import torch
from helpers import assert_close

from spice_fast.spice.parsing import INVALID_REASONS, Invalid, Task, parse_challenger
from spice_fast.spice.prompts import (
    ANSWER_TYPES,
    challenger_prompt,
    draw_answer_type,
    reasoner_prompt,
    render,
)
from spice_fast.spice.rewards import INVALID_REWARD, challenger_reward, reasoner_rewards, role_advantages

MCQ = """<question>Which keyword defines a function in Python?</question>
<options>
A) def
B) func
C) lambda
D) fn
</options>
<answer>A</answer>"""


# ---- rewards ----


def test_challenger_reward_table_of_spice_md():
    table = [0.044, 0.372, 0.823, 0.988, 1.000, 0.988, 0.823, 0.372, 0.044]
    got = [challenger_reward(c, 8) for c in range(9)]
    assert [round(x, 3) for x in got] == table
    assert INVALID_REWARD == -0.1 and INVALID_REWARD < min(got)


def test_challenger_reward_rejects_bad_counts():
    with pytest.raises(ValueError, match="9 of 8"):
        challenger_reward(9, 8)
    with pytest.raises(ValueError, match="of 0"):
        challenger_reward(0, 0)


def test_reasoner_rewards_need_a_boxed_matching_answer():
    responses = [
        "Adding gives 12, so \\boxed{12}.",
        "The answer is 12.",  # right value but no box: 0
        "\\boxed{13}",
        "Option \\boxed{B}",
        "\\boxed{\\frac{1}{2}}",
        None,  # garbage from a broken rollout
    ]
    golds = ["12", "12", "12", "B", "0.5", "1"]
    types = ["integer", "integer", "integer", "mcq", "expression", "integer"]
    assert reasoner_rewards(responses, golds, types) == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="differ in length"):
        reasoner_rewards(["a"], ["a", "b"], [None])


def test_advantages_are_centred_per_role_and_group():
    # The same group id in both roles must not mix them.
    c_rewards, c_groups = [1.0, 0.372, INVALID_REWARD, 0.5, 0.5], [0, 0, 0, 1, 1]
    r_rewards, r_groups = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0], [0, 0, 0, 0, 5, 5]
    c, r = role_advantages(c_rewards, c_groups, r_rewards, r_groups)
    mean0 = (1.0 + 0.372 - 0.1) / 3
    assert_close(c, torch.tensor([1.0 - mean0, 0.372 - mean0, -0.1 - mean0, 0.0, 0.0]), atol=1e-6)
    assert_close(r, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0]), atol=1e-6)


# ---- parsing ----


def test_valid_task_of_each_type():
    assert parse_challenger(MCQ, "mcq") == Task(
        "Which keyword defines a function in Python?", "A", "mcq", ("def", "func", "lambda", "fn")
    )
    assert parse_challenger(
        "<question>How many bits in a byte?</question>\n<answer>8</answer>", "integer"
    ) == Task("How many bits in a byte?", "8", "integer")
    text = "Some thinking first.\n<question>Simplify 2/4.</question><answer>\\frac{1}{2}</answer>"
    assert parse_challenger(text, "expression") == Task("Simplify 2/4.", "\\frac{1}{2}", "expression")
    assert parse_challenger('{"question": "Capital of France?", "answer": "Paris"}', "string") == Task(
        "Capital of France?", "Paris", "string"
    )
    as_json = '{"question": "Pick one", "options": ["x", "y", "z", "w"], "answer": "(C)"}'
    assert parse_challenger(as_json, "mcq") == Task("Pick one", "C", "mcq", ("x", "y", "z", "w"))
    assert parse_challenger('{"question": "2+2?", "answer": 4}', "integer") == Task("2+2?", "4", "integer")


Q = "<question>Q?</question>"


def opts(*letters):
    return "<options>\n" + "".join(f"{x}) {i}\n" for i, x in enumerate(letters)) + "</options>"


MALFORMED = [
    ("no tags at all, just chatter", "integer", "unparseable"),
    ("<question>Q?</question>", "integer", "unparseable"),  # answer missing
    ("<question>A?</question><question>B?</question><answer>1</answer>", "integer", "unparseable"),
    ('{"question": "Q?", "answer": ', "integer", "unparseable"),  # truncated JSON
    ("[1, 2, 3]", "integer", "unparseable"),
    ("<question>  </question><answer>3</answer>", "integer", "empty_field"),
    ("<question>Q?</question><answer></answer>", "string", "empty_field"),
    ("", "string", "unparseable"),
    ("<question>Q?</question><answer>4.5</answer>", "integer", "wrong_type"),
    ("<question>Q?</question><answer>twelve</answer>", "integer", "wrong_type"),
    ("<question>Q?</question><answer>\\frac{1}{2</answer>", "expression", "wrong_type"),  # unbalanced braces
    (Q + opts("A", "B", "C") + "<answer>A</answer>", "mcq", "bad_options"),  # 3 options
    (Q + opts("A", "B", "C", "D", "E") + "<answer>A</answer>", "mcq", "bad_options"),  # 5 options
    (Q + opts("A", "B", "C", "C") + "<answer>A</answer>", "mcq", "bad_options"),  # D missing, C twice
    (Q + "<options>\nA) 1\nB) 2\nC) 3\nD)\n</options><answer>A</answer>", "mcq", "bad_options"),  # empty D
    (Q + "<answer>A</answer>", "mcq", "bad_options"),  # no options at all
    (Q + opts("A", "B", "C", "D") + "<answer>E</answer>", "mcq", "gold_not_in_options"),
    (Q + opts("A", "B", "C", "D") + "<answer>42</answer>", "mcq", "gold_not_in_options"),
    ("<question>" + "long " * 1000 + "</question><answer>1</answer>", "integer", "too_long"),
]  # fmt: skip


@pytest.mark.parametrize("text, answer_type, reason", MALFORMED)
def test_malformed_outputs_are_invalid_with_the_right_reason(text, answer_type, reason):
    result = parse_challenger(text, answer_type)
    assert isinstance(result, Invalid) and result.reason == reason, result
    assert result.reason in INVALID_REASONS


def test_garbage_never_raises():
    rng = random.Random(0)
    alphabet = "<>/{}[]()\\\"':,ABCDE0123456789 \n" + "questionanswerop" + "\x00\ud800é"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 300)))
        assert isinstance(parse_challenger(text, rng.choice(ANSWER_TYPES)), Task | Invalid)
    nested = "{" * 100_000 + "}" * 100_000
    assert parse_challenger(nested, "integer").reason == "unparseable"
    assert parse_challenger(b"<question>bytes</question>", "integer").reason == "unparseable"


# ---- prompts ----


def test_prompts_carry_what_each_role_may_see():
    doc = "The walrus operator := was added in Python 3.8."
    for answer_type in ANSWER_TYPES:
        prompt = challenger_prompt(doc, answer_type)
        assert doc in prompt and "<question>" in prompt and "<answer>" in prompt
        assert ("<options>" in prompt) == (answer_type == "mcq")
    reasoner = reasoner_prompt("Which version added :=?", ["3.6", "3.7", "3.8", "3.9"])
    assert "walrus" not in reasoner and "C) 3.8" in reasoner and "\\boxed{}" in reasoner
    assert render(None, "hi") == "User: hi\n\nAssistant:"
    with pytest.raises(ValueError, match="answer_type"):
        challenger_prompt(doc, "essay")


def test_answer_type_mix():
    rng = random.Random(1)
    draws = [draw_answer_type(rng, {"mcq": 3.0, "integer": 1.0}) for _ in range(4000)]
    assert set(draws) == {"mcq", "integer"} and 0.70 < draws.count("mcq") / 4000 < 0.80
    with pytest.raises(ValueError, match="mix"):
        draw_answer_type(rng, {"essay": 1.0})
