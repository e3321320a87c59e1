"""The Triton paged decode-attention kernel (and flash-attn on a GPU) against the torch reference.

Odd shapes: block tables with holes (scattered blocks, garbage past the context), context lengths
1, 15, 16, 17, 300, GQA ratios 1, 4, 7, head_dim not a power of two, one and several KV splits.
"""

import pytest
import torch
from helpers import assert_close, assert_error_rule
from spice_fast.kernels._utils import interpreter_ready, triton_available
from spice_fast.kernels.paged_attention import paged_decode_attention, paged_decode_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_available() or (DEVICE == "cpu" and not interpreter_ready()),
    reason="Triton needs a GPU or TRITON_INTERPRET=1 (set by conftest.py)",
)


def make_case(lens, num_kv_heads, group, head_dim, block_size, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in lens) + 1  # one spare column of garbage
    num_blocks = sum(-(-n // block_size) for n in lens) + 7
    perm = torch.randperm(num_blocks, generator=gen)  # scattered blocks: holes everywhere
    tables = torch.full((len(lens), max_blocks), 10**6, dtype=torch.int32)  # garbage past the context
    used = 0
    for i, n in enumerate(lens):
        nb = -(-n // block_size)
        tables[i, :nb] = perm[used : used + nb]
        used += nb
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k = torch.randn(shape, generator=gen)
    v = torch.randn(shape, generator=gen)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, generator=gen)
    lens_t = torch.tensor(lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q.to(dtype), k.to(dtype), v.to(dtype), tables, lens_t)]


def reference(q, k, v, tables, lens, scale):
    safe = torch.where(tables >= k.shape[0], 0, tables)  # the reference gathers every column
    return paged_decode_attention_ref(q, k, v, safe, lens, scale)


@needs_triton
@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_triton_kernel_matches_reference_fp32(group, num_splits):
    lens = [1, 15, 16, 17, 300]
    q, k, v, tables, ctx = make_case(
        lens, num_kv_heads=2, group=group, head_dim=24, block_size=16, dtype=torch.float32
    )
    scale = 24**-0.5
    got = paged_decode_attention(q, k, v, tables, ctx, scale, num_splits=num_splits, backend="triton")
    assert_close(got, reference(q, k, v, tables, ctx, scale), atol=2e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("block_size", [8, 16])
def test_triton_kernel_bf16_error_rule(block_size):
    lens = [1, 17, 300, 16]
    q, k, v, tables, ctx = make_case(lens, num_kv_heads=3, group=4, head_dim=64, block_size=block_size,
                                     dtype=torch.bfloat16, seed=1)  # fmt: skip
    scale = 64**-0.5
    got = paged_decode_attention(q, k, v, tables, ctx, scale, num_splits=4, backend="triton")
    exact = reference(q.double(), k.double(), v.double(), tables, ctx, scale)
    torch_bf16 = reference(q, k, v, tables, ctx, scale)
    assert_error_rule(got, torch_bf16, exact, tiny=1e-3)


def test_reference_equals_dense_causal_attention():
    """The reference itself: the last row of dense causal attention over the gathered sequence."""
    lens = [5, 33]
    q, k, v, tables, ctx = make_case(
        lens, num_kv_heads=1, group=7, head_dim=16, block_size=4, dtype=torch.float64
    )
    out = reference(q, k, v, tables, ctx, 0.25)
    for b, n in enumerate(lens):
        blocks = tables[b, : -(-n // 4)].long()
        keys = k[blocks].reshape(-1, 16)[:n]
        values = v[blocks].reshape(-1, 16)[:n]
        weights = torch.softmax((q[b] @ keys.T) * 0.25, dim=-1)  # [7, n]
        assert_close(out[b], weights @ values, atol=1e-12)


def test_auto_backend_on_cpu_is_the_reference():
    q, k, v, tables, ctx = make_case(
        [3, 9], num_kv_heads=2, group=2, head_dim=8, block_size=4, dtype=torch.float32
    )
    if DEVICE == "cpu":
        safe = torch.where(tables >= k.shape[0], 0, tables)
        assert torch.equal(
            paged_decode_attention(q, k, v, safe, ctx, 0.3),
            paged_decode_attention_ref(q, k, v, safe, ctx, 0.3),
        )


def test_shape_errors_name_the_shapes():
    q, k, v, tables, ctx = make_case(
        [3], num_kv_heads=2, group=2, head_dim=8, block_size=4, dtype=torch.float32
    )
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention_ref(q[:, :3], k, v, tables, ctx, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        paged_decode_attention_ref(q, k, v, tables, ctx.repeat(2), 1.0)


@needs_triton
def test_engine_with_triton_kernel_equals_reference_path():
    """End to end: the engine's greedy tokens do not change when decode attention runs in Triton."""
    from tiny_models import hf_model, ours_from_hf

    from spice_fast.engine import Engine, SamplingParams
    from spice_fast.model import set_attention_backend

    model = ours_from_hf(hf_model("qwen3", tied=False)).to(DEVICE)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 9, 200, 31, 7], [44] * 19]
    expected = [o.outputs[0].token_ids for o in Engine(model, block_size=8).generate(prompts, params)]
    set_attention_backend("triton")
    try:
        got = [o.outputs[0].token_ids for o in Engine(model, block_size=8).generate(prompts, params)]
    finally:
        set_attention_backend("auto")
    assert got == expected


@pytest.mark.gpu
@pytest.mark.parametrize("group", [1, 4, 7])
def test_flash_attn_with_kvcache_matches_reference(group):
    pytest.importorskip("flash_attn")
    from flash_attn import flash_attn_with_kvcache

    lens = [1, 15, 16, 17, 300, 700]
    q, k, v, tables, ctx = make_case(lens, num_kv_heads=2, group=group, head_dim=128, block_size=256,
                                     dtype=torch.bfloat16, seed=2)  # fmt: skip
    tables = torch.where(tables >= k.shape[0], 0, tables)
    scale = 128**-0.5
    got = flash_attn_with_kvcache(q.unsqueeze(1), k, v, cache_seqlens=ctx, block_table=tables,
                                  softmax_scale=scale, causal=True).squeeze(1)  # fmt: skip
    exact = reference(q.double(), k.double(), v.double(), tables, ctx, scale)
    assert_error_rule(got, reference(q, k, v, tables, ctx, scale), exact, tiny=1e-3)
