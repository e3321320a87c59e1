"""Prefix-tree attention for training passes on the CPU: forward and backward in C++, no score matrix.

A batch of packed tokens is split into nodes (``TreePlan``): each node is a run of tokens that
attends to all tokens of its ancestors and causally to its own. A prompt shared by G samples is one
node with G child nodes, so a training pass runs the prompt once; a plain packed batch of causal
sequences is a list of roots. This is the pattern of ``spice_fast.model.attention``'s
``AttentionBatch.shared_prefix`` (and of ``packed``), and equals masked softmax attention with the
mask ``TreePlan.dense_mask()``.

* ``tree_attention_ref``: plain PyTorch over the dense mask, the definition of correct (O(N^2) memory:
  tests only).
* ``tree_attention``: the C++ kernel of ``csrc/attention/tree_attention.cpp`` (module
  ``spice_fast._cpu_attention``) for float32 CPU tensors, with autograd. The forward keeps each query
  row's log-sum-exp; the backward recomputes the probabilities from it, flash-attention style, and
  handles the query heads of a KV head together (GQA). Multi-threaded over torch's intra-op threads.

tests/test_tree_attention.py compares the two, forward and backward, on odd trees and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .paged_attention import _cpu_ext, cpu_kernel_available

_MIN_WORK_PER_THREAD = 1 << 21  # multiply-adds: below this one thread finishes sooner


@dataclass(frozen=True)
class TreePlan:
    """Where each node's tokens are and which token ranges they attend to, for the C++ kernel."""

    nodes: torch.Tensor  # [num_nodes, 4] int64: first token, tokens, first ancestor range, end of its ranges
    ranges: torch.Tensor  # [num_ranges, 2] int64: first token, tokens (each node's ancestors, root first)
    num_tokens: int
    num_pairs: int  # (query, key) pairs attended: the work is num_pairs x heads x head_dim x 2 per product

    def dense_mask(self) -> torch.Tensor:  # [num_tokens, num_tokens] bool, True = attend
        mask = torch.zeros(self.num_tokens, self.num_tokens, dtype=torch.bool)
        ranges = self.ranges.tolist()
        for start, length, first, end in self.nodes.tolist():
            rows = slice(start, start + length)
            for r_start, r_len in ranges[first:end]:
                mask[rows, r_start : r_start + r_len] = True
            mask[rows, rows] = torch.ones(length, length, dtype=torch.bool).tril()
        return mask


def tree_node(node, what: str = "tree node") -> tuple[int, list]:
    """One node of a prefix tree as (length, children), a leaf length as (n, []); ``ValueError``
    naming ``what`` when it is neither a length >= 0 nor (length, [children])."""
    if isinstance(node, int) and not isinstance(node, bool):
        node = (node, [])
    ok = isinstance(node, tuple | list) and len(node) == 2 and isinstance(node[0], int) and node[0] >= 0
    if not ok or not isinstance(node[1], list | tuple):
        raise ValueError(f"bad {what}: {node!r} is not a length >= 0 or (length, [children])")
    return node[0], list(node[1])


def tree_plan(trees: list) -> TreePlan:
    """The plan of prefix trees laid out depth first, one after the other: a node's tokens, then each
    child's subtree in order (the layout of ``AttentionBatch.shared_prefix``). Empty nodes are dropped."""
    nodes, ranges = [], []
    offset = pairs = 0
    stack = [(tree, ()) for tree in reversed(trees)]  # (node, ancestors' (start, length))
    while stack:
        node, ancestors = stack.pop()
        length, children = tree_node(node)
        start, offset = offset, offset + length
        if length:
            nodes.append((start, length, len(ranges), len(ranges) + len(ancestors)))
            ranges.extend(ancestors)
            pairs += length * sum(n for _, n in ancestors) + length * (length + 1) // 2
            ancestors = (*ancestors, (start, length))
        stack.extend((child, ancestors) for child in reversed(children))
    return TreePlan(
        torch.tensor(nodes, dtype=torch.int64).reshape(-1, 4),
        torch.tensor(ranges, dtype=torch.int64).reshape(-1, 2),
        offset,
        pairs,
    )


def tree_attention_ref(
    q: torch.Tensor,  # [N, num_heads, D]
    k: torch.Tensor,  # [N, num_kv_heads, D]
    v: torch.Tensor,  # [N, num_kv_heads, D]
    plan: TreePlan,
    scale: float,
) -> torch.Tensor:  # [N, num_heads, D]
    _check(q, k, v, plan)
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~plan.dense_mask().to(q.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), v)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: TreePlan) -> None:
    if (
        q.dim() != 3
        or k.dim() != 3
        or k.shape != v.shape
        or k.shape[0] != q.shape[0]
        or k.shape[2] != q.shape[2]
    ):
        raise ValueError(
            f"q [N, heads, D] and k, v [N, kv_heads, D] expected, got {q.shape}, {k.shape}, {v.shape}"
        )
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"num_heads {q.shape[1]} must be a multiple of num_kv_heads {k.shape[1]}")
    if q.shape[0] != plan.num_tokens:
        raise ValueError(f"the plan covers {plan.num_tokens} tokens, q has {q.shape[0]}")
    for name, t, width in (("nodes", plan.nodes, 4), ("ranges", plan.ranges, 2)):
        ok = t.dtype == torch.int64 and t.device.type == "cpu" and t.is_contiguous()
        if not ok or t.dim() != 2 or t.shape[1] != width:
            raise ValueError(
                f"plan.{name} must be a contiguous int64 CPU tensor [n, {width}] (see tree_plan), "
                f"got {t.dtype} {tuple(t.shape)} on {t.device}"
            )


def tree_attention_supported(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether ``tree_attention`` takes these tensors: float32 on the CPU, head_dim a multiple of 16, at
    most 64 query heads per KV head, and the extension built."""
    return (
        q.device.type == k.device.type == "cpu"
        and q.dtype == k.dtype == torch.float32
        and q.shape[-1] % 16 == 0
        and q.shape[1] // max(k.shape[1], 1) <= 64
        and cpu_kernel_available()
    )


def _threads(plan: TreePlan, q: torch.Tensor) -> int:
    work = plan.num_pairs * q.shape[1] * q.shape[2] * 2
    return max(1, min(torch.get_num_threads(), work // _MIN_WORK_PER_THREAD))


def _args(q, k, v, plan, scale):
    n, heads, dim = q.shape
    return (
        q.data_ptr(), k.data_ptr(), v.data_ptr(), plan.nodes.data_ptr(), plan.ranges.data_ptr(), n, heads,
        k.shape[1], dim, plan.nodes.shape[0], plan.ranges.shape[0], scale,
    )  # fmt: skip


class _TreeAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: TreePlan, scale: float, num_threads: int):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32)  # [N, heads] log-sum-exp of each row's scores
        _cpu_ext[0].tree_forward(out.data_ptr(), lse.data_ptr(), *_args(q, k, v, plan, scale), num_threads)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.num_threads = plan, scale, num_threads
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        _cpu_ext[0].tree_backward(
            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), out.data_ptr(), lse.data_ptr(), grad_out.data_ptr(),
            *_args(q, k, v, ctx.plan, ctx.scale), ctx.num_threads,
        )  # fmt: skip
        return dq, dk, dv, None, None, None


def tree_attention(
    q: torch.Tensor,  # [N, num_heads, D] float32, CPU
    k: torch.Tensor,  # [N, num_kv_heads, D]
    v: torch.Tensor,  # [N, num_kv_heads, D]
    plan: TreePlan,
    scale: float,
    num_threads: int | None = None,
) -> torch.Tensor:  # [N, num_heads, D]
    """The C++ kernel (differentiable). ``num_threads``: default torch's intra-op count, one thread for
    small work."""
    _check(q, k, v, plan)
    if not tree_attention_supported(q, k) or v.dtype != torch.float32 or v.device.type != "cpu":
        raise ValueError(
            "tree_attention takes float32 CPU tensors with head_dim a multiple of 16 and a built extension; "
            f"got {q.dtype} q on {q.device}, head_dim {q.shape[-1]} (use tree_attention_ref otherwise)"
        )
    threads = _threads(plan, q) if num_threads is None else num_threads
    if threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return _TreeAttention.apply(q, k, v, plan, float(scale), threads)
