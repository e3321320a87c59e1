"""The model family against transformers: logits parity, packed and paged modes, config errors."""

import pytest
import torch
from helpers import assert_close
from tiny_models import FAMILY, VOCAB, hf_config, hf_model, ours_from_hf

from spice_fast.model import AttentionBatch, CausalLM, ModelConfig, PagedKVCache

ARCHS = sorted(FAMILY)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(arch, tied):
    hf = hf_model(arch, tied=tied)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, VOCAB, (3, 29), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.dtype == torch.float32 and got.shape == (3, 29, VOCAB)
    assert expected.abs().max() > 1.0  # logits far from zero, so the bound below means something
    assert_close(got, expected, atol=1e-4, name=f"{arch} tied={tied}")


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
    ],
)  # fmt: skip
def test_rope_scaling_matches_transformers(rope_scaling):
    hf = hf_model("llama", tied=False, rope_scaling=rope_scaling, rope_theta=500000.0)
    ours = ours_from_hf(hf)
    assert ours.config.rope_scaling["rope_type"] == rope_scaling["rope_type"]
    ids = torch.randint(0, VOCAB, (2, 200), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, atol=1e-4, name=str(rope_scaling["rope_type"]))


def test_attention_bias_llama_matches_transformers():
    hf = hf_model("llama", tied=False, attention_bias=True, mlp_bias=True)
    ours = ours_from_hf(hf)
    assert ours.model.layers[0].self_attn.o_proj.bias is not None
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(ours(ids), hf(ids).logits, atol=1e-4)


def test_contract_hidden_states_and_lm_head():
    ours = ours_from_hf(hf_model("qwen3", tied=True))
    ids = torch.randint(0, VOCAB, (2, 7))
    hidden = ours.hidden_states(ids)
    assert hidden.shape == (2, 7, 64)
    assert ours.lm_head_weight is ours.model.embed_tokens.weight
    with torch.no_grad():
        assert_close(ours(ids), hidden @ ours.lm_head_weight.T, atol=1e-5)
    untied = ours_from_hf(hf_model("llama", tied=False))
    assert untied.lm_head_weight is untied.lm_head.weight
    assert untied.lm_head_weight.shape == (VOCAB, 64)


def test_bf16_model_returns_float32_logits():
    ours = ours_from_hf(hf_model("llama", tied=True)).to(torch.bfloat16)
    logits = ours(torch.randint(0, VOCAB, (1, 5)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_varlen_equals_separate_sequences(arch):
    ours = ours_from_hf(hf_model(arch, tied=False))
    gen = torch.Generator().manual_seed(4)
    lens = [5, 1, 13, 8]
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in lens]
    with torch.no_grad():
        packed = ours.forward_hidden(torch.cat(seqs), AttentionBatch.packed(lens, "cpu"))
        separate = torch.cat([ours.hidden_states(s[None])[0] for s in seqs])
    assert_close(packed, separate, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_paged_decode_equals_dense(arch):
    """Prefill two prompts into a shuffled block pool, decode token by token, compare with dense logits."""
    ours = ours_from_hf(hf_model(arch, tied=False))
    gen = torch.Generator().manual_seed(5)
    block_size, num_new = 4, 9
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (6, 3)]
    continuations = [torch.randint(0, VOCAB, (num_new,), generator=gen) for _ in prompts]
    cache = PagedKVCache.allocate(ours.config, 16, block_size, torch.float32, "cpu")
    # Non-contiguous, interleaved blocks: the block table, not the layout, must decide.
    tables = torch.tensor([[7, 2, 11, 0, 5], [3, 14, 9, 1, 6]], dtype=torch.int32)

    def slot(seq, pos):
        return int(tables[seq, pos // block_size]) * block_size + pos % block_size

    lens = [len(p) for p in prompts]
    slots = torch.tensor([slot(s, i) for s, n in enumerate(lens) for i in range(n)])
    with torch.no_grad():
        ours.forward_hidden(torch.cat(prompts), AttentionBatch.packed(lens, "cpu", slots), cache)
        for step in range(num_new):
            pos = torch.tensor([n + step for n in lens])
            tokens = torch.stack([c[step] for c in continuations])
            batch = AttentionBatch.decode(
                pos,
                tables,
                (pos + 1).to(torch.int32),
                torch.tensor([slot(s, int(p)) for s, p in enumerate(pos)]),
            )
            got = ours.logits(ours.forward_hidden(tokens, batch, cache))
            for s in range(2):
                full = torch.cat([prompts[s], continuations[s][: step + 1]])
                expected = ours(full[None])[0, -1]
                assert_close(got[s], expected, atol=1e-4, name=f"seq {s} step {step}")


def test_gradient_checkpointing_gives_same_gradients():
    ours = ours_from_hf(hf_model("qwen2", tied=True))
    ids = torch.randint(0, VOCAB, (2, 9))
    grads = []
    for recompute in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = recompute
        ours(ids).logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in ours.parameters()])
    for a, b in zip(*grads, strict=True):
        assert_close(b, a, atol=1e-6)


def test_unknown_architecture_names_it_and_the_supported_ones():
    d = hf_config("llama", tied=True).to_dict()
    d["architectures"] = ["MambaForCausalLM"]
    with pytest.raises(
        ValueError, match=r"MambaForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"
    ):
        ModelConfig.from_hf(d)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_key_value_heads": 3}, "num_kv_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_scaling type 'yarn'"),
        ({"use_sliding_window": True}, "use_sliding_window"),
    ],
)
def test_bad_config_values_raise_clear_errors(change, message):
    d = hf_config("qwen2", tied=True).to_dict()
    d.update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf(d)


def test_config_round_trips_through_hf_dict():
    for arch in ARCHS:
        for tied in (True, False):
            config = ModelConfig.from_hf(hf_config(arch, tied=tied).to_dict())
            again = ModelConfig.from_hf(config.to_hf())
            assert again == config


def test_bad_input_ids_raise():
    ours = CausalLM(ModelConfig.from_hf(hf_config("llama", tied=True).to_dict()))
    with pytest.raises(ValueError, match=r"\[B, T\] LongTensor"):
        ours(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B, T\] LongTensor"):
        ours(torch.zeros(1, 5, dtype=torch.int32))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_bfloat16_error_within_twice_transformers_error(arch, device):
    """STYLE.md error rule: vs a float64 reference, our bf16 logits err at most 2x transformers' bf16."""
    hf = hf_model(arch, tied=False)
    ours = ours_from_hf(hf)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        reference = ours_from_hf(hf).double().to(device)(ids)
        hf_err = (hf.to(device, torch.bfloat16)(ids).logits.double() - reference).abs().max().item()
        ours_err = (ours.to(device, torch.bfloat16)(ids).double() - reference).abs().max().item()
    assert hf_err > 0
    assert ours_err <= 2 * hf_err + 1e-6, (ours_err, hf_err)


@pytest.mark.gpu
def test_flash_attention_varlen_matches_sdpa_on_gpu():
    pytest.importorskip("flash_attn")
    from spice_fast.model import set_attention_backend

    ours = ours_from_hf(hf_model("qwen3", tied=False)).to("cuda", torch.bfloat16)
    lens = [17, 1, 64, 33]
    ids = torch.randint(0, VOCAB, (sum(lens),), generator=torch.Generator().manual_seed(8)).cuda()
    batch = AttentionBatch.packed(lens, "cuda")
    with torch.no_grad():
        flash = ours.forward_hidden(ids, batch)
        set_attention_backend("torch")
        try:
            sdpa = ours.forward_hidden(ids, batch)
        finally:
            set_attention_backend("auto")
    assert_close(flash.float(), sdpa.float(), atol=3e-2, rtol=3e-2)


def test_shared_prefix_batch_equals_each_branch_run_alone():
    """AttentionBatch.shared_prefix: a prefix once, then branches that see it and themselves only."""
    model = ours_from_hf(hf_model("qwen3", tied=False)).double()
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, VOCAB, (7,), generator=gen)
    branches = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (3, 0, 5, 1)]
    lone = torch.randint(0, VOCAB, (4,), generator=gen)
    ids = torch.cat([prefix, *branches, lone])
    batch = AttentionBatch.shared_prefix([(7, [3, 0, 5, 1]), (4, [])], "cpu")
    assert batch.positions.tolist()[7:16] == [7, 8, 9, 7, 8, 9, 10, 11, 7]
    with torch.no_grad():
        hidden = model.forward_hidden(ids, batch)
        offset = 7
        for branch in branches:
            alone = model.hidden_states(torch.cat([prefix, branch])[None])[0]
            assert_close(hidden[:7], alone[:7], atol=1e-12, name="prefix")
            assert_close(hidden[offset : offset + len(branch)], alone[7:], atol=1e-12, name="branch")
            offset += len(branch)
        assert_close(hidden[offset:], model.hidden_states(lone[None])[0], atol=1e-12, name="plain segment")
    with pytest.raises(ValueError, match="bad segment"):
        AttentionBatch.shared_prefix([(3, [-1])], "cpu")


def test_prefix_tree_batch_equals_each_path_run_alone():
    """A two-level tree: a document prefix, a branch of its own, a shared suffix with three branches
    under it (one empty), and a chain (a node with one child) that is one causal run."""
    model = ours_from_hf(hf_model("llama", tied=True)).double()
    gen = torch.Generator().manual_seed(1)
    tok = lambda n: torch.randint(0, VOCAB, (n,), generator=gen)  # noqa: E731
    prefix, own, shared, leaves = tok(6), tok(4), tok(5), [tok(3), tok(0), tok(2)]
    chain_root, chain_mid, chain_leaf = tok(2), tok(3), tok(4)
    ids = torch.cat([prefix, own, shared, *leaves, chain_root, chain_mid, chain_leaf])
    batch = AttentionBatch.shared_prefix([(6, [4, (5, [3, 0, 2])]), (2, [(3, [4])])], "cpu")
    assert batch.segments == [(6, [(4, []), (5, [(3, []), (2, [])])]), (9, [])]  # collapsed
    assert batch.positions.tolist()[:20] == [*range(10), *range(6, 11), 11, 12, 13, 11, 12]
    with torch.no_grad():
        hidden = model.forward_hidden(ids, batch)
        paths = [
            ([prefix, own], [(0, 6), (6, 10)]),
            ([prefix, shared, leaves[0]], [(0, 6), (10, 15), (15, 18)]),
            ([prefix, shared, leaves[2]], [(0, 6), (10, 15), (18, 20)]),
            ([chain_root, chain_mid, chain_leaf], [(20, 29)]),
        ]
        for parts, spans in paths:
            alone = model.hidden_states(torch.cat(parts)[None])[0]
            got = torch.cat([hidden[a:b] for a, b in spans])
            assert_close(got, alone, atol=1e-12, name=f"path of {len(parts)} parts")
    with pytest.raises(ValueError, match="bad segment"):
        AttentionBatch.shared_prefix([(3, [(2, "x")])], "cpu")
    with pytest.raises(ValueError, match="no tokens"):
        AttentionBatch.shared_prefix([(0, [0, (0, [])])], "cpu")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("samples", [3, 12])  # 9 rows (dot-product tiles), 36 (a 32-row broadcast block + 4)
def test_cpu_decode_step_in_one_call_equals_python_layers(arch, samples, monkeypatch):
    """The engine's CPU decode steps through decode_layers_cpu (all layers in one C++ call) draw the
    tokens of the Python layers (SPICE_FAST_CPU_DECODE=torch) with their logprobs; the call really ran."""
    from spice_fast.kernels.linear import small_gemm_available

    import spice_fast.model.transformer as transformer
    from spice_fast.engine import Engine, SamplingParams

    if not small_gemm_available():
        pytest.skip("the one-call decode step needs the C++ small-row GEMM (AVX-512)")
    model = ours_from_hf(hf_model(arch, tied=arch == "qwen2"))
    calls = []
    real = transformer.decode_layers_cpu
    monkeypatch.setattr(transformer, "decode_layers_cpu", lambda *a: calls.append(1) or real(*a))
    prompts = [
        torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in (5, 23, 40)
    ]
    params = SamplingParams(n=samples, temperature=0.9, max_tokens=24, seed=7, ignore_eos=True)
    outs = {}
    for mode in ("torch", "auto"):
        monkeypatch.setenv("SPICE_FAST_CPU_DECODE", mode)
        engine = Engine(model, max_num_seqs=3 * samples, max_model_len=128, block_size=16)
        outs[mode] = [c for out in engine.generate(prompts, params) for c in out.outputs]
        assert bool(calls) == (mode == "auto")
    for ref, fast in zip(outs["torch"], outs["auto"], strict=True):
        assert fast.token_ids == ref.token_ids
        assert_close(torch.tensor(fast.logprobs), torch.tensor(ref.logprobs), atol=2e-5)
