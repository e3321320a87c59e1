"""The minimal generator over the paged decode mode against transformers' generate, and the CLI."""

import pytest
import torch
from tiny_models import VOCAB, hf_model, ours_from_hf

from spice_fast import cli
from spice_fast.generate import generate


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_greedy_equals_transformers_generate(arch):
    hf = hf_model(arch, tied=False)
    ours = ours_from_hf(hf)
    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 12, 1)]
    outs = generate(ours, prompts, max_new_tokens=24, block_size=4)
    for prompt, out in zip(prompts, outs, strict=True):
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert out == expected


def test_stop_token_ends_a_sequence_and_is_kept():
    ours = ours_from_hf(hf_model("llama", tied=True))
    prompt = [5, 6, 7]
    free = generate(ours, [prompt], max_new_tokens=10)[0]
    stop = free[3]
    first = free.index(stop)
    out = generate(ours, [prompt, prompt], max_new_tokens=10, stop_token_ids=[stop])
    assert out[0] == out[1] == free[: first + 1]


def test_sampling_is_seeded():
    ours = ours_from_hf(hf_model("qwen2", tied=True))
    a = generate(ours, [[1, 2, 3]] * 3, max_new_tokens=12, temperature=1.0, seed=3)
    b = generate(ours, [[1, 2, 3]] * 3, max_new_tokens=12, temperature=1.0, seed=3)
    assert a == b
    assert len({tuple(x) for x in a}) > 1  # three samples of one prompt are not all equal


def test_bad_arguments_raise():
    ours = ours_from_hf(hf_model("llama", tied=True))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(ours, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="outside"):
        generate(ours, [[VOCAB]], max_new_tokens=2)
    with pytest.raises(ValueError, match="non-empty"):
        generate(ours, [[]], max_new_tokens=2)


def test_cli_reports_bad_model_in_one_line(capsys, tmp_path):
    assert cli.main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert "spice-fast: error:" in err and "not found" in err and "Traceback" not in err
