"""Trainer configuration: presets, YAML files and key=value overrides onto typed dataclasses."""

import pytest

from spice_fast.train.config import PRESETS, TrainConfig, from_dict, make_config, parse_override, to_dict


def test_presets_build_and_differ():
    tiny, paper = make_config("cpu-tiny"), make_config("paper")
    assert isinstance(tiny, TrainConfig) and tiny.rollout.temperature == 0.7 and tiny.steps == 5
    assert tiny.model.name == "smollm2-135m" and tiny.corpus.source == "pydoc"
    assert (paper.spice.num_docs, paper.spice.num_challenger_samples, paper.spice.num_reasoner_samples) == (
        128,
        8,
        8,
    )
    assert paper.steps == 640 and paper.optim.lr == 1e-6 and paper.rollout.temperature == 1.0
    assert paper.spice.invalid_reward == -0.1 and paper.loss.clip_low == paper.loss.clip_high == 0.2
    assert sorted(PRESETS) == ["cpu-tiny", "paper"]


def test_overrides_are_typed_and_nested():
    c = make_config(overrides=[
        "steps=7", "optim.lr=2e-6", "spice.answer_type_mix={mcq: 1, integer: 0}", "model.dtype=null",
        "loss.tis_cap=3", "loss.old_logprobs=recompute", "tensorboard=false", "corpus.source=/data/docs",
    ])  # fmt: skip
    assert c.steps == 7 and c.optim.lr == 2e-6 and isinstance(c.loss.tis_cap, float)
    assert c.spice.answer_type_mix == {"mcq": 1.0, "integer": 0.0}  # replaced, not merged
    assert c.tensorboard is False and c.corpus.source == "/data/docs" and c.model.dtype is None
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\nspice:\n  num_docs: 3\noptim:\n  lr: 1.0e-5\n")
    c = make_config(file=path, overrides=["spice.num_docs=4"])
    assert (c.steps, c.spice.num_docs, c.optim.lr) == (5, 4, 1e-5)
    assert from_dict(to_dict(c)) == c  # what a run saves, it reads back


@pytest.mark.parametrize(
    "override, message",
    [
        ("spice.num_dox=3", "spice.num_dox: unknown config key"),
        ("steps=three", "steps: expected an int, got 'three'"),
        ("steps=0", "steps: expected an int >= 1, got 0"),
        ("optim.lr=-1", "optim.lr: expected > 0, got -1.0"),
        ("loss.agg=mean", "loss.agg: expected one of"),
        ("loss.tis_cap=2", "loss.tis_cap: expected None unless loss.old_logprobs=recompute"),
        ("spice.answer_type_mix={essay: 1}", "spice.answer_type_mix: expected non-negative weights"),
        ("rollout.max_model_len=100", "rollout.max_model_len: expected more than the longest completion"),
        ("tensorboard=maybe", "tensorboard: expected true or false"),
        ("spice=3", "spice: expected a mapping"),
        ("novalue", "expected key=value"),
        ("optim={fsdp: true, shard_state: true}", "optim.fsdp and optim.shard_state: choose one"),
    ],
)
def test_bad_values_name_the_key_and_value(override, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        make_config(overrides=[override])


def test_bad_preset_and_files(tmp_path):
    with pytest.raises(ValueError, match="preset: expected one of"):
        make_config("huge")
    with pytest.raises(ValueError, match="not found"):
        make_config(file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="expected a mapping at the top"):
        make_config(file=bad)
    bad.write_text("steps: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        make_config(file=bad)
