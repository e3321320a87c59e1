"""Prompts of both SPICE roles, in one place (the paper did not publish its texts).

* Challenger: sees a document and the answer type to produce, writes one self-contained question in
  a tagged format that ``spice_fast.spice.parsing`` reads strictly.
* Reasoner: sees only the question (and its options for multiple choice), reasons step by step and
  puts the final answer in ``\\boxed{}``.

``render`` applies the tokenizer's chat template when the model has one and a plain
``User: / Assistant:`` template for base models. The document comes before anything that depends on
the answer type, so the challenger samples of one document share their prompt up to its end (the
trainer runs that shared prefix once). The challenger prompt shows one short example of the
format (on an unrelated topic) and the challenger's reply is started with ``CHALLENGER_PREFIX``
(``<question>``): small models then keep the tagged format far more often. The parser reads the
prefix plus the completion.
"""

from __future__ import annotations

import random
from typing import Any

ANSWER_TYPES = ("mcq", "integer", "expression", "string")

_TYPE_INSTRUCTIONS = {
    "mcq": (
        "Write a multiple-choice question with exactly four options labelled A, B, C and D, exactly one "
        "of them correct. Put the options in an <options> block, one per line as 'A) ...'. The answer is "
        "the letter of the correct option."
    ),
    "integer": "Write a question whose answer is a single integer. The answer is that integer, digits only.",
    "expression": (
        "Write a question whose answer is a mathematical expression or number (a fraction, a root, a "
        "formula). The answer is that expression in LaTeX, without dollar signs."
    ),
    "string": (
        "Write a question whose answer is a short phrase of at most five words. The answer is that phrase."
    ),
}

CHALLENGER_PREFIX = "<question>"  # the start of the challenger's reply, part of its prompt

# One example of the reply format per answer type, on topics no corpus document is about.
_EXAMPLES = {
    "mcq": (
        "<question>A bakery sells rolls in bags of 6. How many bags are needed for 45 rolls?</question>\n"
        "<options>\nA) 6\nB) 7\nC) 8\nD) 9\n</options>\n<answer>C</answer>"
    ),
    "integer": (
        "<question>A bakery sells rolls in bags of 6. How many bags are needed for 45 rolls?</question>\n"
        "<answer>8</answer>"
    ),
    "expression": (
        "<question>A square has area a. What is the length of its diagonal, in terms of a?</question>\n"
        "<answer>\\sqrt{2a}</answer>"
    ),
    "string": (
        "<question>Which gas do green plants take in from the air to make sugar?</question>\n"
        "<answer>carbon dioxide</answer>"
    ),
}


def copied_questions() -> frozenset[str]:
    """Questions a challenger may copy from its own prompt (the format examples and placeholders),
    normalised with ``normalize_question``; such a task is invalid."""
    questions = {"the question", "..."}
    for example in _EXAMPLES.values():
        questions.add(example.split("<question>", 1)[1].split("</question>", 1)[0])
    return frozenset(normalize_question(q) for q in questions)


def normalize_question(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .?!:")


_CHALLENGER_TEMPLATE = """You write exam questions from a document. A student will answer your question \
WITHOUT seeing the document, so the question must be self-contained: state every fact, definition and \
number the student needs, and never refer to "the document", "the text" or "the passage". Make the \
question hard: it should take several reasoning steps, and its answer must follow from the document.

Document:
<document>
{document}
</document>

{type_instruction}

An example of the format, on another topic:
{example}

Reply in exactly this format and nothing else:
<question>the question</question>
{options_line}<answer>the answer</answer>"""

_REASONER_TEMPLATE = """{question}{options}

Think step by step, then give your final answer in \\boxed{{}}{answer_hint}."""


def draw_answer_type(rng: random.Random, mix: dict[str, float]) -> str:
    """One answer type drawn with the weights of ``mix`` (keys among ANSWER_TYPES)."""
    bad = sorted(set(mix) - set(ANSWER_TYPES))
    if bad or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"answer type mix must weight {ANSWER_TYPES} with non-negative weights, got {mix}")
    types = sorted(mix)
    return rng.choices(types, weights=[mix[t] for t in types], k=1)[0]


def challenger_prompt(document: str, answer_type: str) -> str:
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"answer_type must be one of {ANSWER_TYPES}, got {answer_type!r}")
    options_line = "<options>\nA) ...\nB) ...\nC) ...\nD) ...\n</options>\n" if answer_type == "mcq" else ""
    return _CHALLENGER_TEMPLATE.format(
        type_instruction=_TYPE_INSTRUCTIONS[answer_type],
        document=document.strip(),
        options_line=options_line,
        example=_EXAMPLES[answer_type],
    )


def reasoner_prompt(question: str, options: list[str] | None = None) -> str:
    if options:
        listed = "\n" + "\n".join(f"{'ABCD'[i]}) {opt}" for i, opt in enumerate(options))
        hint = " as the letter of the correct option"
    else:
        listed, hint = "", ""
    return _REASONER_TEMPLATE.format(question=question.strip(), options=listed, answer_hint=hint)


def render(tokenizer: Any, user_text: str, response_prefix: str = "") -> str:
    """The prompt text the model sees: its chat template when it has one, else a plain template;
    ``response_prefix`` starts the model's reply."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], add_generation_prompt=True, tokenize=False
        )
        return text + response_prefix
    return f"User: {user_text}\n\nAssistant:" + (" " + response_prefix if response_prefix else "")


def encode(tokenizer: Any, user_text: str, response_prefix: str = "") -> list[int]:
    """Token ids of a rendered prompt. A chat template holds its own special tokens, so they are not
    added again (a BOS would be doubled on Llama tokenizers); plain prompts get them."""
    text = render(tokenizer, user_text, response_prefix)
    templated = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer.encode(text, add_special_tokens=not templated))
