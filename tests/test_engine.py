"""The rollout engine against transformers and against its own invariants (issue 3)."""

import pytest
import torch
from helpers import assert_close
from tiny_models import VOCAB, hf_model, ours_from_hf

from spice_fast.engine import Engine, SamplingParams
from spice_fast.model import PagedKVCache

ARCHS = ["llama", "qwen2", "qwen3"]


def prompts_of(lengths, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in lengths]


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_transformers_generate(arch):
    hf = hf_model(arch, tied=arch == "qwen2")
    engine = Engine(ours_from_hf(hf), max_num_seqs=8, max_model_len=256, block_size=16)
    prompts = prompts_of([5, 16, 1, 37])
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=64, ignore_eos=True))
    hf.generation_config.eos_token_id = None  # both sides run the full 64 tokens
    for prompt, out in zip(prompts, outs, strict=True):
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, pad_token_id=0)
        expected = expected[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == expected
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_logprobs_equal_full_forward(temperature, top_p):
    model = ours_from_hf(hf_model("qwen3", tied=False))
    engine = Engine(model, max_num_seqs=16, max_model_len=128, block_size=8)
    prompts = prompts_of([7, 19, 3])
    params = SamplingParams(n=3, temperature=temperature, top_p=top_p, max_tokens=20, seed=1, ignore_eos=True)
    for prompt, out in zip(prompts, engine.generate(prompts, params), strict=True):
        for c in out.outputs:
            full = torch.tensor([prompt + c.token_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(full)[0] / temperature, dim=-1)
            expected = logp[len(prompt) - 1 : -1].gather(1, torch.tensor(c.token_ids)[:, None]).squeeze(1)
            got = torch.tensor(c.logprobs)
            assert got.dtype == torch.float32 and len(c.logprobs) == len(c.token_ids)
            assert_close(got, expected, atol=1e-4)


def test_prefix_blocks_are_shared_by_all_samples():
    model = ours_from_hf(hf_model("llama", tied=True))
    engine = Engine(model, max_num_seqs=8, max_model_len=256, block_size=16)
    (prompt,) = prompts_of([100])
    out = engine.generate([prompt], SamplingParams(n=8, max_tokens=2, seed=0, ignore_eos=True))
    assert len(out[0].outputs) == 8
    # 6 full prompt blocks held once + one partial block (4 tokens, then up to 6) per sample.
    assert engine.stats.peak_blocks_used == 6 + 8
    assert engine.stats.num_prefill_tokens == 100


def test_seeded_request_is_reproducible_whatever_else_is_batched():
    model = ours_from_hf(hf_model("qwen2", tied=False))
    engine = Engine(model, max_num_seqs=32, max_model_len=128, block_size=4)
    target, *others = prompts_of([9, 4, 30, 12])
    params = SamplingParams(n=4, temperature=1.0, top_k=50, max_tokens=24, seed=1234, ignore_eos=True)
    alone = engine.generate([target], params)[0]
    unseeded = SamplingParams(n=2, temperature=1.0, max_tokens=30, ignore_eos=True)
    mixed = engine.generate([others[0], target, others[1]], [unseeded, params, unseeded])[1]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed.outputs]
    assert len({tuple(c.token_ids) for c in alone.outputs}) > 1  # samples differ from each other


def test_in_place_weight_change_is_seen_by_next_call():
    model = ours_from_hf(hf_model("llama", tied=False))
    engine = Engine(model, max_num_seqs=4, max_model_len=64)
    prompt = prompts_of([6])
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    before = engine.generate(prompt, params)[0].outputs[0].token_ids
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # an "optimizer step" on the very tensor the engine reads
    after = engine.generate(prompt, params)[0].outputs[0].token_ids
    assert after != before
    with torch.no_grad():
        expected = model(torch.tensor(prompt))[0, -1].argmax().item()
    assert after[0] == expected


def test_pool_exhaustion_completes_every_request():
    model = ours_from_hf(hf_model("qwen3", tied=True))
    # 12 blocks of 4 tokens: each request alone fits, all together need ~10x that.
    engine = Engine(
        model, max_num_seqs=16, max_model_len=64, block_size=4, kv_cache_gb=12 * model_block_gb(model, 4)
    )
    assert engine.pool.num_blocks == 12
    prompts = prompts_of([10, 7, 13, 5, 9, 11])
    params = SamplingParams(n=3, temperature=1.0, max_tokens=30, seed=5, ignore_eos=True)
    outs = engine.generate(prompts, params)
    assert all(len(c.token_ids) == 30 and c.finish_reason == "length" for o in outs for c in o.outputs)
    assert engine.stats.num_preemptions > 0
    # Preemption recomputes, and keyed noise makes the result identical to an unconstrained run.
    roomy = Engine(model, max_num_seqs=32, max_model_len=64, block_size=4)
    assert [[c.token_ids for c in o.outputs] for o in roomy.generate(prompts, params)] == [
        [c.token_ids for c in o.outputs] for o in outs
    ]


def model_block_gb(model, block_size):
    return PagedKVCache.bytes_per_block(model.config, block_size, model.dtype) / 1024**3


def test_impossible_request_raises_naming_lengths():
    model = ours_from_hf(hf_model("llama", tied=True))
    engine = Engine(
        model, max_num_seqs=4, max_model_len=512, block_size=4, kv_cache_gb=5 * model_block_gb(model, 4)
    )
    with pytest.raises(
        ValueError, match=r"request 1 needs 21 tokens \(6 blocks of 4\).*5 blocks \(20 tokens\)"
    ):
        engine.generate([[1, 2], [3] * 11], SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(model, max_model_len=8).generate([[1] * 8], SamplingParams(max_tokens=2))


def test_stop_tokens_and_max_model_len():
    model = ours_from_hf(hf_model("qwen2", tied=True))
    engine = Engine(model, max_num_seqs=4, max_model_len=20)
    prompt = prompts_of([6])
    free = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0].outputs[
        0
    ]
    stop = free.token_ids[4]
    out = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop]))[
        0
    ].outputs[0]
    assert out.token_ids == free.token_ids[: free.token_ids.index(stop) + 1] and out.finish_reason == "stop"
    capped = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))[
        0
    ].outputs[0]
    assert len(capped.token_ids) == 20 - 6 and capped.finish_reason == "length"


def test_top_k_one_is_greedy_and_top_p_keeps_the_nucleus():
    model = ours_from_hf(hf_model("llama", tied=False))
    engine = Engine(model, max_num_seqs=8, max_model_len=64)
    prompt = prompts_of([5])
    greedy = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))[0]
    topk1 = engine.generate(prompt, SamplingParams(n=3, top_k=1, max_tokens=15, seed=2, ignore_eos=True))[0]
    assert all(c.token_ids == greedy.outputs[0].token_ids for c in topk1.outputs)
    tiny_p = engine.generate(prompt, SamplingParams(n=2, top_p=1e-6, max_tokens=15, seed=3, ignore_eos=True))[
        0
    ]
    assert all(c.token_ids == greedy.outputs[0].token_ids for c in tiny_p.outputs)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n": 0}, "n must be"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": [""]}, "stop"),
    ],
)
def test_bad_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_bad_prompts():
    engine = Engine(ours_from_hf(hf_model("llama", tied=True)), max_num_seqs=2, max_model_len=32)
    with pytest.raises(ValueError, match="no tokenizer"):
        engine.generate(["a string"])
    with pytest.raises(ValueError, match="outside"):
        engine.generate([[VOCAB + 5]])
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]])
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        engine.generate([[1, 2]], SamplingParams(stop=["x"]))


def test_prefix_cache_reuses_a_shared_document_across_requests():
    """Requests that start with the same blocks (one document, several answer types) prefill the
    document once; tokens and logprobs equal those of an engine without the cache and a full forward."""
    model = ours_from_hf(hf_model("qwen2", tied=True))
    doc, a, b, c = prompts_of([53, 9, 14, 3], seed=3)
    prompts = [doc + a, doc + b, doc + c, doc[:40] + a, list(doc)]  # doc[:40]: 2 full blocks of 16 shared
    params = SamplingParams(n=2, temperature=0.8, max_tokens=12, seed=4, ignore_eos=True)
    cached = Engine(model, max_num_seqs=16, max_model_len=128, block_size=16)
    plain = Engine(model, max_num_seqs=16, max_model_len=128, block_size=16, enable_prefix_caching=False)
    out_plain = plain.generate(prompts, params)
    # one call: the first request is prefilled alone, the others wait a step and read its blocks
    out_cached = cached.generate(prompts, params)
    assert plain.stats.num_cached_prompt_tokens == 0
    # the later prompts find the document's 3 full blocks (48 tokens; 32 for the short one) cached
    assert cached.stats.num_cached_prompt_tokens == 48 + 48 + 32 + 48
    assert cached.stats.num_prefill_tokens == plain.stats.num_prefill_tokens - (48 + 48 + 32 + 48)
    for prompt, x, y in zip(prompts, out_cached, out_plain, strict=True):
        for cx, cy in zip(x.outputs, y.outputs, strict=True):
            assert cx.token_ids == cy.token_ids
            assert_close(torch.tensor(cx.logprobs), torch.tensor(cy.logprobs), atol=1e-5)
            with torch.no_grad():
                full = torch.log_softmax(model(torch.tensor([prompt + cx.token_ids]))[0] / 0.8, -1)
            expected = full[len(prompt) - 1 : -1].gather(1, torch.tensor(cx.token_ids)[:, None])[:, 0]
            assert_close(torch.tensor(cx.logprobs), expected, atol=1e-4)


def test_prefix_cache_defers_a_prompt_whose_blocks_are_being_prefilled():
    """Prompts that share more than the cached blocks with a prompt prefilled in the same step wait
    for it: every document (after a common system prompt) is prefilled once, however the requests of
    several documents are interleaved."""
    model = ours_from_hf(hf_model("llama", tied=True))
    system, doc_a, doc_b, x, y = prompts_of([20, 40, 35, 5, 7], seed=11)
    prompts = [system + doc_a + x, system + doc_b + x, system + doc_a + y, system + doc_b + y]
    params = SamplingParams(n=2, temperature=0.9, max_tokens=6, seed=5, ignore_eos=True)
    cached = Engine(model, max_num_seqs=16, max_model_len=128, block_size=8)
    plain = Engine(model, max_num_seqs=16, max_model_len=128, block_size=8, enable_prefix_caching=False)
    outs = cached.generate(prompts, params)
    # full blocks of 8: the system prompt's 2 (16 of 20 tokens), system + doc_a's 7 (56 of 60 tokens),
    # system + doc_b's 6 (48 of 55): the second document's prompts find the system prompt, the later
    # ones their whole document
    assert cached.stats.num_cached_prompt_tokens == 16 + 56 + 48
    assert cached.stats.num_prefill_tokens == sum(map(len, prompts)) - (16 + 56 + 48)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [
        [c.token_ids for c in o.outputs] for o in plain.generate(prompts, params)
    ]
    assert cached.pool.num_used == 0


def test_prefix_cache_gives_way_when_the_pool_is_short():
    model = ours_from_hf(hf_model("qwen3", tied=True))
    engine = Engine(
        model, max_num_seqs=16, max_model_len=64, block_size=4, kv_cache_gb=14 * model_block_gb(model, 4)
    )
    doc, a, b = prompts_of([12, 3, 5], seed=6)
    prompts = [doc + a, doc + b, doc + a + b, doc]
    params = SamplingParams(n=3, temperature=1.0, max_tokens=20, seed=2, ignore_eos=True)
    outs = engine.generate(prompts, params)
    roomy = Engine(model, max_num_seqs=32, max_model_len=64, block_size=4, enable_prefix_caching=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [
        [c.token_ids for c in o.outputs] for o in roomy.generate(prompts, params)
    ]
    assert engine.pool.num_used == 0  # nothing leaked, cache references included
