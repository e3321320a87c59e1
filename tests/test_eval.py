"""spice-fast eval: data parsing (every skip reason), scoring on known responses, the command end to end."""

import json
import logging

import pytest

from spice_fast import cli
from spice_fast.evaluate import (
    SKIP_REASONS,
    EvalRecord,
    encode_prompt,
    evaluate,
    parse_record,
    read_eval_data,
    score,
)
from spice_fast.spice import prompts

GOOD = [
    {"question": "What is 6 * 7?", "answer": 42, "type": "integer"},
    {"question": "Which is prime?", "choices": ["4", "6", "7", "9"], "answer": "C"},
    {"question": "Colour?", "choices": {"A": "red", "B": "dog", "C": "cat", "D": "cow"}, "answer": "red"},
    {"question": "Simplify 2/4.", "answer": "\\frac{1}{2}", "type": "expression"},
    {"question": "Capital of France?", "answer": "Paris", "type": "string"},
    {"question": "What is 1 + 1?", "answer": "2"},
    {"question": "Half of one?", "answer": 0.5, "type": None},
]

BAD = {
    "invalid_json": '{"question": "cut off',
    "not_an_object": '["question", "answer"]',
    "missing_field": '{"question": "no answer"}',
    "empty_field": '{"question": "  ", "answer": "1"}',
    "wrong_type": '{"question": "q", "answer": true}',
    "bad_type": '{"question": "q", "answer": "1", "type": "essay"}',
    "bad_choices": '{"question": "q", "choices": ["a", "b", "c"], "answer": "A"}',
    "answer_not_in_choices": '{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "e"}',
}


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_good_lines_of_each_kind(tmp_path):
    records, skipped = read_eval_data(write_jsonl(tmp_path / "d.jsonl", GOOD))
    assert skipped == {}
    assert [r.answer_type for r in records] == ["integer", "mcq", "mcq", "expression", "string", None, None]
    assert [r.answer for r in records] == ["42", "C", "A", "\\frac{1}{2}", "Paris", "2", "0.5"]
    assert records[2].choices == ("red", "dog", "cat", "cow")
    assert [r.line for r in records] == list(range(1, 8))


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "(b)"}', "B"),
        ('{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "D."}', "D"),
        ('{"question": "q", "choices": ["x y", "b", "c", "d"], "answer": "X  Y"}', "A"),
        ('{"question": "q", "choices": {"a": "1", "b": "2", "c": "3", "d": "4"}, "answer": "4"}', "D"),
        ('{"question": "q", "choices": ["x", "x", "c", "d"], "answer": "x"}', "answer_not_in_choices"),
        ('{"question": "q", "choices": ["a", "b", "c", "d"], "answer": "A", "type": "integer"}', "bad_type"),
        ('{"question": "q", "answer": "A", "type": "mcq"}', "bad_type"),
        ('{"question": "q", "choices": ["a", "b", "c", ""], "answer": "A"}', "bad_choices"),
        ('{"question":"q","choices":{"A":"1","B":"2","C":"3","E":"4"},"answer":"A"}', "bad_choices"),
        ('{"question": "q", "choices": [1, 2, 3, 4], "answer": "A"}', "bad_choices"),
        ('{"question": 7, "answer": "1"}', "wrong_type"),
        ('{"question": "q", "answer": NaN}', "wrong_type"),
        ('{"question": "q", "answer": "1", "type": 3}', "wrong_type"),
        ('{"question": "q", "answer": ""}', "empty_field"),
        (b'{"question": "\xff", "answer": "1"}', "invalid_json"),
    ],
)
def test_parse_record_cases(line, expected):
    out = parse_record(line)
    assert (out.answer if isinstance(out, EvalRecord) else out) == expected


def test_bad_lines_are_skipped_and_counted_with_one_warning(tmp_path, caplog):
    lines = [GOOD[0], *BAD.values(), "", GOOD[1], BAD["invalid_json"]]
    with caplog.at_level(logging.WARNING, logger="spice_fast.evaluate"):
        records, skipped = read_eval_data(write_jsonl(tmp_path / "d.jsonl", lines))
    assert len(records) == 2
    assert list(skipped) == list(SKIP_REASONS)
    assert skipped == {reason: 2 if reason == "invalid_json" else 1 for reason in SKIP_REASONS}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].message
    assert "skipped 9 bad lines" in message and "invalid_json 2 (line 2, 12)" in message


def test_all_bad_and_missing_files_raise_naming_the_path(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", list(BAD.values()))
    with pytest.raises(ValueError, match="bad.jsonl.*no usable line"):
        read_eval_data(path)
    with pytest.raises(ValueError, match="not found.*missing.jsonl"):
        read_eval_data(tmp_path / "missing.jsonl")


def test_score_on_known_responses():
    records = [
        EvalRecord("q1", "42", "integer"),
        EvalRecord("q2", "42", "integer"),
        EvalRecord("q3", "B", "mcq", ("a", "b", "c", "d")),
        EvalRecord("q4", "B", "mcq", ("a", "b", "c", "d")),
        EvalRecord("q5", "\\frac{1}{2}", "expression"),
        EvalRecord("q6", "7", None),
    ]
    responses = [
        "6 * 7, so \\boxed{42}",
        "the answer is 42",  # no box: wrong, although the answer is extractable
        "\\boxed{B}",
        "\\boxed{C}",
        "\\boxed{0.5}",
        "\\boxed{7}",
    ]
    result = score(records, responses, ["stop", "stop", "length", "stop", "stop", "stop"])
    assert [p.correct for p in result.predictions] == [True, False, True, False, True, True]
    assert [p.extracted for p in result.predictions] == ["42", "42", "B", "C", "0.5", "7"]
    assert result.num_correct == 4 and result.accuracy == 4 / 6
    assert result.num_unboxed == 1 and result.num_truncated == 1
    assert result.per_type == {
        "mcq": {"count": 2, "num_correct": 1, "accuracy": 0.5},
        "integer": {"count": 2, "num_correct": 1, "accuracy": 0.5},
        "expression": {"count": 1, "num_correct": 1, "accuracy": 1.0},
        "auto": {"count": 1, "num_correct": 1, "accuracy": 1.0},
    }
    with pytest.raises(ValueError, match="differ in length"):
        score(records, responses[:2])


class _FakeTokenizer:
    """Records how encode is called; a chat template or none."""

    def __init__(self, chat_template):
        self.chat_template = chat_template
        self.calls = []

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return f"<user>{messages[0]['content']}<assistant>"

    def encode(self, text, add_special_tokens=True):
        self.calls.append((text, add_special_tokens))
        return [1, 2, 3]


def test_encode_prompt_adds_special_tokens_only_without_a_chat_template():
    record = EvalRecord("Which?", "A", "mcq", ("w", "x", "y", "z"))
    for template, special in (("{{ x }}", False), (None, True)):
        tok = _FakeTokenizer(template)
        assert encode_prompt(tok, record) == [1, 2, 3]
        text, added = tok.calls[0]
        assert added is special
        assert text == prompts.render(tok, prompts.reasoner_prompt("Which?", ["w", "x", "y", "z"]))
        assert "A) w\nB) x" in text


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from tiny_models import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model")


def test_eval_command_end_to_end(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "qs.jsonl", [*GOOD, BAD["bad_choices"]])
    argv = ["eval", "--model", str(tiny_model_dir), "--data", str(data), "--max-tokens", "8", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["num_records"] == len(GOOD) and summary["num_skipped_lines"] == {"bad_choices": 1}
    assert 0 < summary["num_generated_tokens"] <= 8 * len(GOOD)
    assert "integer" in out.splitlines()[1] or "mcq" in out.splitlines()[1]
    lines = (tmp_path / "qs.predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(GOOD)
    preds = [json.loads(line) for line in lines]
    fields = {"index", "line", "question", "choices", "gold", "type", "response", "extracted", "correct"}
    assert all(fields | {"finish_reason"} <= set(p) for p in preds)
    assert [p["gold"] for p in preds] == ["42", "C", "A", "\\frac{1}{2}", "Paris", "2", "0.5"]
    assert all(p["finish_reason"] in ("stop", "length") and isinstance(p["correct"], bool) for p in preds)
    assert not list(tmp_path.glob(".*tmp*"))

    custom = tmp_path / "custom.jsonl"
    argv += ["--out", str(custom), "--limit", "2"]
    assert cli.main(argv) == 0
    assert len(custom.read_text().splitlines()) == 2


def test_evaluate_counts_prompts_that_do_not_fit(tiny_model_dir):
    import spice_fast

    model, tokenizer = spice_fast.load(str(tiny_model_dir))
    records = [EvalRecord("x " * 200, "1", "integer"), EvalRecord("1?", "1", "integer")]
    result = evaluate(model, tokenizer, records, max_tokens=4, max_model_len=128, progress=False)
    assert [p.finish_reason for p in result.predictions][0] == "prompt_too_long"
    assert result.num_prompt_too_long == 1 and not result.predictions[0].correct
    assert result.predictions[1].finish_reason in ("stop", "length")


def test_eval_command_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["eval", "--data", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "spice-fast: error:" in err and "nope.jsonl" in err and "Traceback" not in err
    data = write_jsonl(tmp_path / "d.jsonl", GOOD[:1])
    assert cli.main(["eval", "--data", str(data), "--out", str(tmp_path / "no" / "p.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
