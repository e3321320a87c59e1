"""The C++ prefix-tree attention kernel (forward and backward) against the dense-mask reference, and
inside the model against the PyTorch (SDPA) paths.

Odd trees: single tokens, empty nodes, chains, nodes longer than a key tile (64) and than a row block
(16) by one, roots only (plain packed batches); GQA groups 1, 3, 4, 5 and 8 (runs of 3 heads plus a
rest), head_dim 16 to 128, one and two threads.
"""

import dataclasses

import pytest
import torch
from helpers import assert_close, assert_error_rule
from spice_fast.kernels.tree_attention import (
    cpu_kernel_available,
    tree_attention,
    tree_attention_ref,
    tree_plan,
)

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="the C++ extension is not built")

TREES = {
    "one token": [1],
    "roots": [37, 1, 65, 16],
    "prefix, two branches": [(20, [7, 9])],
    "empty root": [(0, [3, 4])],
    "update-like": [(81, [17, (30, [17, 16, 1])]), (60, [3, 3])],
    "deep, empty leaves": [33, (17, [1, (2, [80, 0, 5]), 0])],
}


def make_inputs(plan, heads, kv_heads, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = plan.num_tokens
    q = torch.randn(n, heads, dim, generator=gen, dtype=torch.float64)
    k = torch.randn(n, kv_heads, dim, generator=gen, dtype=torch.float64)
    v = torch.randn(n, kv_heads, dim, generator=gen, dtype=torch.float64)
    grad = torch.randn(n, heads, dim, generator=gen, dtype=torch.float64)
    return q, k, v, grad


def forward_backward(fn, q, k, v, grad):
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad.to(out.dtype)))


@pytest.mark.parametrize("tree", TREES, ids=list(TREES))
@pytest.mark.parametrize(
    "heads, kv_heads, dim", [(9, 3, 64), (4, 4, 16), (8, 2, 32), (5, 1, 128), (8, 1, 16)]
)
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_reference(tree, heads, kv_heads, dim, threads):
    plan = tree_plan(TREES[tree])
    q, k, v, grad = make_inputs(plan, heads, kv_heads, dim)
    scale = dim**-0.5
    truth = forward_backward(lambda *x: tree_attention_ref(*x, plan, scale), q, k, v, grad)
    f32 = [x.float() for x in (q, k, v, grad)]
    torch32 = forward_backward(lambda *x: tree_attention_ref(*x, plan, scale), *f32)
    ours = forward_backward(lambda *x: tree_attention(*x, plan, scale, num_threads=threads), *f32)
    for name, a, t, e in zip(("out", "dq", "dk", "dv"), ours, torch32, truth, strict=True):
        # float32 sums over head_dim products of values of about 1 (scores, dO.V, rowsum(dO*O)) and over
        # heads x keys terms: a few ulps of sqrt(head_dim) times the largest value. (One key gives
        # dq = 0 exactly in float64, dO.V - rowsum(dO*O) rounded in float32.)
        assert_error_rule(a, t, e, tiny=2e-7 * dim**0.5 * max(1.0, e.abs().max().item()), name=name)


def test_two_threads_are_deterministic_and_match_one():
    """Two threads split the items at fixed points and sum their key/value gradients in a fixed order."""
    plan = tree_plan(TREES["update-like"])
    q, k, v, grad = (x.float() for x in make_inputs(plan, 9, 3, 64, seed=3))
    one = forward_backward(lambda *x: tree_attention(*x, plan, 0.125, num_threads=1), q, k, v, grad)
    two = forward_backward(lambda *x: tree_attention(*x, plan, 0.125, num_threads=2), q, k, v, grad)
    again = forward_backward(lambda *x: tree_attention(*x, plan, 0.125, num_threads=2), q, k, v, grad)
    for name, a, b, c in zip(("out", "dq", "dk", "dv"), one, two, again, strict=True):
        assert torch.equal(b, c), name
        assert_close(b, a, atol=1e-5, name=name)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])  # rows are never split


def test_non_contiguous_inputs_and_plan_of_plain_sequences():
    plan = tree_plan([5, 40])
    assert plan.nodes.tolist() == [[0, 5, 0, 0], [5, 40, 0, 0]] and plan.num_pairs == 15 + 820
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(45, 6 + 2 + 2, 16, generator=gen)  # q, k, v as slices of one projection
    q, k, v = qkv[:, :6], qkv[:, 6:8], qkv[:, 8:]
    assert not q.is_contiguous()
    ref = tree_attention_ref(q.double(), k.double(), v.double(), plan, 0.25)
    assert_close(tree_attention(q, k, v, plan, 0.25), ref, atol=2e-6)


def test_tree_plan_layout_and_mask():
    plan = tree_plan([(2, [1, (0, [2])]), 3])
    # nodes: root 0-1, leaf 2, (empty node dropped) leaf 3-4 under the root, root 5-7
    assert plan.nodes.tolist() == [[0, 2, 0, 0], [2, 1, 0, 1], [3, 2, 1, 2], [5, 3, 2, 2]]
    assert plan.ranges.tolist() == [[0, 2], [0, 2]]
    mask = plan.dense_mask().int().tolist()
    assert mask[3] == [1, 1, 0, 1, 0, 0, 0, 0] and mask[4] == [1, 1, 0, 1, 1, 0, 0, 0]
    assert mask[6] == [0, 0, 0, 0, 0, 1, 1, 0]
    assert plan.num_pairs == sum(map(sum, mask))
    with pytest.raises(ValueError, match="bad tree node"):
        tree_plan([(3, [-1])])


def test_bad_inputs_name_the_problem():
    plan = tree_plan([(4, [3])])
    q, k, v = torch.randn(7, 4, 16), torch.randn(7, 2, 16), torch.randn(7, 2, 16)
    with pytest.raises(ValueError, match="covers 7 tokens, q has 6"):
        tree_attention(q[:6], k[:6], v[:6], plan, 0.25)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tree_attention(q[:, :3], k, v, plan, 0.25)
    with pytest.raises(ValueError, match="float32 CPU tensors"):
        tree_attention(q.double(), k.double(), v.double(), plan, 0.25)
    with pytest.raises(ValueError, match="head_dim 8"):
        tree_attention(q[..., :8], k[..., :8], v[..., :8], plan, 0.25)
    with pytest.raises(ValueError, match="num_threads"):
        tree_attention(q, k, v, plan, 0.25, num_threads=0)
    with pytest.raises(ValueError, match="plan.nodes must be a contiguous int64"):
        tree_attention(q, k, v, dataclasses.replace(plan, nodes=plan.nodes.int()), 0.25)
    with pytest.raises(ValueError, match="plan.ranges must be a contiguous int64"):
        tree_attention(q, k, v, dataclasses.replace(plan, ranges=plan.ranges.reshape(-1)), 0.25)
    from spice_fast import _cpu_attention

    def call(nodes, ranges):
        nodes = torch.tensor(nodes, dtype=torch.int64).reshape(-1, 4)
        ranges = torch.tensor(ranges, dtype=torch.int64).reshape(-1, 2)
        out, lse = torch.empty_like(q), torch.empty(7, 4)
        _cpu_attention.tree_forward(
            out.data_ptr(), lse.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), nodes.data_ptr(),
            ranges.data_ptr(), 7, 4, 2, 16, nodes.shape[0], ranges.shape[0], 0.25, 1,
        )  # fmt: skip

    call([[0, 4, 0, 0], [4, 3, 0, 1]], [[0, 4]])  # the plan above: fine
    with pytest.raises(ValueError, match="token 3 is in two nodes"):
        call([[0, 4, 0, 0], [3, 4, 0, 1]], [[0, 4]])
    with pytest.raises(ValueError, match="cover 4 of the 7 tokens"):
        call([[0, 4, 0, 0]], [])
    with pytest.raises(ValueError, match="node 1: tokens"):
        call([[0, 4, 0, 0], [4, 5, 0, 1]], [[0, 4]])
    with pytest.raises(ValueError, match="range 0: tokens"):
        call([[0, 4, 0, 0], [4, 3, 0, 1]], [[5, 4]])
    with pytest.raises(ValueError, match="ranges \\[0, 2\\)"):
        call([[0, 4, 0, 0], [4, 3, 0, 2]], [[0, 4]])


@pytest.mark.parametrize("arch, overrides", [
    ("llama", {"hidden_size": 96, "num_attention_heads": 6}),  # head_dim 16, GQA 3:1
    ("qwen3", {"head_dim": 16}),  # q/k norms, GQA 4:1
])  # fmt: skip
def test_model_uses_the_kernel_and_matches_sdpa(arch, overrides, monkeypatch):
    """A training pass over a prefix-tree batch and a plain packed batch: hidden states and every
    parameter's gradient through the kernel against the SDPA paths (float64 truth, float32 torch), and
    with gradient checkpointing (the same bits)."""
    from tiny_models import VOCAB, hf_model, ours_from_hf

    from spice_fast.model import AttentionBatch, set_attention_backend
    from spice_fast.model import attention as attention_module

    calls = []
    kernel = attention_module.tree_attention
    monkeypatch.setattr(
        attention_module, "tree_attention", lambda *a, **k: calls.append(1) or kernel(*a, **k)
    )
    hf = hf_model(arch, tied=False, **overrides)
    gen = torch.Generator().manual_seed(5)
    for batch in (
        AttentionBatch.shared_prefix([(21, [5, (17, [3, 0, 2])]), (4, [])], "cpu"),
        AttentionBatch.packed([9, 70, 1], "cpu"),
    ):
        ids = torch.randint(0, VOCAB, (batch.positions.numel(),), generator=gen)
        weight = torch.randn(ids.numel(), hf.config.hidden_size, generator=gen)
        results = {}
        runs = (("truth", torch.float64, "torch"), ("torch32", torch.float32, "torch"),
                ("kernel", torch.float32, "auto"), ("recompute", torch.float32, "auto"))  # fmt: skip
        for name, dtype, backend in runs:
            model = ours_from_hf(hf).to(dtype).train()
            model.gradient_checkpointing = name == "recompute"  # the kernel's forward runs again in backward
            set_attention_backend(backend)
            try:
                hidden = model.forward_hidden(ids, batch)
                (hidden * weight.to(dtype)).sum().backward()
            finally:
                set_attention_backend("auto")
            results[name] = [hidden] + [p.grad for p in model.parameters() if p.grad is not None]
        assert len(results["kernel"]) == len(results["truth"]) > 10
        for i, (a, t, e) in enumerate(
            zip(results["kernel"], results["torch32"], results["truth"], strict=True)
        ):
            assert_error_rule(a, t, e, tiny=1e-5 * e.abs().max().item(), name=f"tensor {i}")
        for a, b in zip(results["recompute"], results["kernel"], strict=True):
            assert torch.equal(a, b)
    # every layer of both batches, the kernel runs only: once, and twice with recomputation
    assert len(calls) == 2 * 3 * hf.config.num_hidden_layers
    monkeypatch.setenv("SPICE_FAST_TREE_ATTENTION", "torch")
    ours_from_hf(hf).forward_hidden(ids, batch)
    assert len(calls) == 2 * 3 * hf.config.num_hidden_layers  # the switch keeps the SDPA paths
    monkeypatch.setenv("SPICE_FAST_TREE_ATTENTION", "cpp")
    with pytest.raises(ValueError, match="SPICE_FAST_TREE_ATTENTION must be"):
        ours_from_hf(hf).forward_hidden(ids, batch)
