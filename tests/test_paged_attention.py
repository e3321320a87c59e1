"""The paged decode-attention kernels (Triton, the C++ CPU kernel, flash-attn on a GPU) against the
torch reference.

Odd shapes: block tables with holes (scattered blocks, garbage past the context), context lengths
1, 15, 16, 17, 300, GQA ratios 1, 4, 7, head_dim not a power of two, one and several KV splits.
"""

import pytest
import torch
from helpers import assert_close, assert_error_rule
from spice_fast.kernels._utils import interpreter_ready, triton_available
from spice_fast.kernels.paged_attention import (
    cpu_kernel_available,
    paged_decode_attention,
    paged_decode_attention_cpu,
    paged_decode_attention_ref,
)

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


def cpu_kernel_checked(q, k, v, tables, ctx, scale, threads):
    """The C++ kernel's output on ``threads`` threads, checked against the fp64 reference by the error
    rule (fp32 CPU tensors)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = paged_decode_attention_cpu(q, k, v, tables, ctx, scale)
    finally:
        torch.set_num_threads(before)
    exact = reference(q.double(), k.double(), v.double(), tables, ctx, scale)
    assert_error_rule(got, reference(q, k, v, tables, ctx, scale), exact, tiny=1e-6)
    return got


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


def test_cpu_kernel_is_built():
    """`pip install .` builds spice_fast._cpu_attention; without it the CPU engine silently slows down."""
    assert cpu_kernel_available()


# group: query heads per KV head, summed over values up to 8 heads at a time (10: a group of 8 and 2)
@pytest.mark.parametrize("group", [1, 3, 4, 7, 10])
@pytest.mark.parametrize("block_size", [16, 5, 40])  # 40: two runs of 16 positions and 8 more
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("head_dim", [24, 64])  # 64: scores 16 positions at a time
def test_cpu_kernel_matches_reference_fp32(group, block_size, threads, head_dim):
    lens = [1, 15, 16, 17, 300, 2]
    q, k, v, tables, ctx = make_case(
        lens, num_kv_heads=2, group=group, head_dim=head_dim, block_size=block_size, dtype=torch.float32
    )
    q, k, v, tables, ctx = (t.cpu() for t in (q, k, v, tables, ctx))
    scale = head_dim**-0.5
    got = cpu_kernel_checked(q, k, v, tables, ctx, scale, threads)
    assert got.dtype == torch.float32


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_kernel_sequences_sharing_leading_blocks(threads):
    """Samples of one prompt read its blocks from the same pool entries: the kernel runs those pages once
    for the group (groups split to spread over the threads). Groups of 4 sharing 3 full pages, one of
    them shorter than the shared part, a pair sharing 1 page then diverging, a sequence whose last
    shared-looking block is only partly in its context, and sequences sharing nothing."""
    block = 16
    lens = [70, 61, 49, 40, 33, 20, 47, 40, 5, 90]
    q, k, v, tables, ctx = make_case(
        lens, num_kv_heads=3, group=3, head_dim=64, block_size=block, dtype=torch.float32, seed=5
    )
    q, k, v, tables, ctx = (t.cpu() for t in (q, k, v, tables, ctx))
    tables[1:4, :3] = tables[0, :3]  # 61 and 49 tokens: 3 full pages shared; 40: only 2 are full
    tables[5, :2] = tables[4, :2]  # 20 tokens: page 1 is partial in sequence 5
    tables[6:8, :1] = tables[4, :1]  # 47 and 40 tokens: share page 0 with 4 and 5 (not adjacent to 4)
    scale = 64**-0.5
    cpu_kernel_checked(q, k, v, tables, ctx, scale, threads)


def test_cpu_kernel_threads_on_long_contexts():
    """Enough work (above 2^18 multiply-adds per thread) that the kernel splits sequences over threads."""
    lens = [9000, 1, 17, 9000, 8000, 15000]
    q, k, v, tables, ctx = make_case(
        lens, num_kv_heads=2, group=7, head_dim=24, block_size=16, dtype=torch.float32
    )
    q, k, v, tables, ctx = (t.cpu() for t in (q, k, v, tables, ctx))
    scale = 24**-0.5
    cpu_kernel_checked(q, k, v, tables, ctx, scale, threads=3)


def test_cpu_kernel_bf16_error_rule():
    lens = [1, 17, 300, 16, 64]
    q, k, v, tables, ctx = make_case(lens, num_kv_heads=3, group=3, head_dim=64, block_size=16,
                                     dtype=torch.bfloat16, seed=1)  # fmt: skip
    q, k, v, tables, ctx = (t.cpu() for t in (q, k, v, tables, ctx))
    got = paged_decode_attention_cpu(q, k, v, tables, ctx, 0.125)
    assert got.dtype == torch.bfloat16
    exact = reference(q.double(), k.double(), v.double(), tables, ctx, 0.125)
    assert_error_rule(got, reference(q, k, v, tables, ctx, 0.125), exact, tiny=1e-3)


def test_cpu_kernel_extreme_scores_stay_finite():
    """Scores far apart (a peaked softmax) and all strongly negative: no NaN, the reference's values."""
    q, k, v, tables, ctx = (t.cpu() for t in make_case(
        [40, 3], num_kv_heads=1, group=2, head_dim=16, block_size=4, dtype=torch.float32, seed=2
    ))  # fmt: skip
    for scale in (40.0, -40.0):
        got = paged_decode_attention_cpu(q, k, v, tables, ctx, scale)
        assert torch.isfinite(got).all()
        exact = reference(q.double(), k.double(), v.double(), tables, ctx, scale)
        assert_close(got.double(), exact, atol=1e-5, rtol=1e-5)


def test_cpu_kernel_rejects_bad_tables_and_devices():
    q, k, v, tables, ctx = (t.cpu() for t in make_case(
        [9, 20], num_kv_heads=2, group=2, head_dim=8, block_size=4, dtype=torch.float32
    ))  # fmt: skip
    bad = tables.clone()
    bad[1, 2] = k.shape[0]  # inside the context of sequence 1: must be checked, not read
    with pytest.raises(ValueError, match=rf"block_tables\[1, 2\] = {k.shape[0]} is outside the pool"):
        paged_decode_attention_cpu(q, k, v, bad, ctx, 1.0)
    with pytest.raises(ValueError, match=r"context_lens\[0\] = 40 needs more blocks"):
        paged_decode_attention_cpu(q, k, v, tables, torch.tensor([40, 20], dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        paged_decode_attention_cpu(q[:, :3], k, v, tables, ctx, 1.0)


def test_engine_with_cpu_kernel_equals_reference_path():
    """End to end: the engine's greedy tokens and logprobs do not change with the C++ decode kernel."""
    from tiny_models import hf_model, ours_from_hf

    from spice_fast.engine import Engine, SamplingParams
    from spice_fast.model import set_attention_backend

    model = ours_from_hf(hf_model("qwen3", tied=False))
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [[5, 9, 200, 31, 7], [44] * 19, list(range(3, 40))]
    got = Engine(model, block_size=8).generate(prompts, params)
    set_attention_backend("torch")
    try:
        expected = Engine(model, block_size=8).generate(prompts, params)
    finally:
        set_attention_backend("auto")
    for a, b in zip(got, expected, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert_close(torch.tensor(a.outputs[0].logprobs), torch.tensor(b.outputs[0].logprobs), atol=1e-5)


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
