"""fused_grpo_loss == policy_loss(fused_linear_logprob(...)) in loss and gradients, and vs fp64 references.

Triton kernels run under TRITON_INTERPRET=1 on a CPU (set by tests/conftest.py).
Run: python -m pytest -q tests/test_kernels_fused_grpo.py
"""

import pytest
import torch
from helpers import LargestTensor, assert_close, assert_error_rule
from spice_fast.kernels import (
    fused_grpo_loss,
    fused_linear_logprob,
    fused_linear_logprob_ref,
    policy_loss,
    policy_loss_ref,
)
from spice_fast.kernels._utils import interpreter_ready, triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = triton_available() and (DEVICE == "cuda" or interpreter_ready())
SKIP_TRITON = pytest.mark.skipif(
    not TRITON_HERE, reason="Triton needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)"
)
BACKENDS = ["torch", pytest.param("triton", marks=SKIP_TRITON)]


def make_problem(num_seqs, seq_len, hidden_size, vocab, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_seqs, seq_len, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5 * 2
    targets = torch.randint(0, vocab, (num_seqs, seq_len), generator=g)
    mask = torch.rand(num_seqs, seq_len, generator=g) > 0.2
    mask[-1] = False  # an all-masked sequence
    targets[~mask] = -100  # padding ids at masked positions must be ignored
    with torch.no_grad():
        safe = targets.clamp(min=0).reshape(-1)
        cur = fused_linear_logprob_ref(hidden.reshape(-1, hidden_size), weight, safe).view(num_seqs, seq_len)
    old = cur + torch.randn(num_seqs, seq_len, generator=g) * 0.3  # ratios on both sides of the clip range
    adv = torch.randn(num_seqs, generator=g)
    ref = cur + torch.randn(num_seqs, seq_len, generator=g) * 0.2
    isw = torch.rand(num_seqs, seq_len, generator=g) * 2
    hidden, weight = hidden.to(DEVICE, dtype), weight.to(DEVICE, dtype)
    return hidden, weight, *(t.to(DEVICE) for t in (targets, old, adv, mask, ref, isw))


def grads_of(loss_fn, hidden, weight):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, metrics = loss_fn(h, w)
    loss.backward()
    return loss, h.grad, w.grad, metrics


def unfused(
    targets, old, adv, mask, backend, temperature, chunk_size, fn=fused_linear_logprob, pl=None, **kw
):
    def loss_fn(h, w):
        shape = targets.shape
        safe = targets.clamp(min=0).reshape(-1)
        h2 = h.reshape(-1, h.shape[-1])
        if fn is fused_linear_logprob:
            lp = fn(h2, w, safe, temperature=temperature, backend=backend, chunk_size=chunk_size)
            return policy_loss(lp.view(shape), old, adv, mask, backend=backend, **kw)
        lp = fn(h2, w, safe, temperature=temperature).view(shape)
        return policy_loss_ref(lp, old.to(lp.dtype), adv.to(lp.dtype), mask, **kw)

    return loss_fn


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape,agg,extras,temperature,chunk_size",
    [
        ((1, 1, 64), "drgrpo", False, 1.0, None),
        ((4, 19, 64), "token_mean", True, 0.8, 16),
        ((4, 50, 128), "seq_mean_token_mean", True, 1.0, 128),
        ((3, 23, 64), "drgrpo", True, 1.2, 7),
    ],
)
def test_fused_equals_unfused_and_reference(backend, dtype, shape, agg, extras, temperature, chunk_size):
    num_seqs, seq_len, hidden_size = shape
    hidden, weight, targets, old, adv, mask, ref, isw = make_problem(
        num_seqs, seq_len, hidden_size, 1037, dtype
    )
    kw = dict(agg=agg, clip_low=0.2, clip_high=0.28)
    if extras:
        kw.update(ref_logprobs=ref, kl_coef=0.05, is_weights=isw, max_new_tokens=seq_len + 3)
    fused = grads_of(
        lambda h, w: fused_grpo_loss(
            h,
            w,
            targets,
            old,
            adv,
            mask,
            temperature=temperature,
            backend=backend,
            chunk_size=chunk_size,
            **kw,
        ),
        hidden,
        weight,
    )
    composed = grads_of(
        unfused(targets, old, adv, mask, backend, temperature, chunk_size, **kw), hidden, weight
    )
    same = grads_of(
        unfused(targets, old, adv, mask, None, temperature, None, fn=fused_linear_logprob_ref, **kw),
        hidden,
        weight,
    )
    kw64 = {
        k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()
    }
    exact = grads_of(
        unfused(
            targets,
            old.double(),
            adv.double(),
            mask,
            None,
            temperature,
            None,
            fn=fused_linear_logprob_ref,
            **kw64,
        ),
        hidden.double(),
        weight.double(),
    )
    tiny = 1e-6 if dtype == torch.float32 else 1e-3
    for i, name in enumerate(("loss", "grad_hidden", "grad_weight")):
        assert torch.isfinite(fused[i]).all(), name
        assert fused[i].dtype == (torch.float32 if i == 0 else dtype), name
        assert_error_rule(fused[i], same[i], exact[i], tiny=tiny, name=f"fused {name} vs fp64")
        # the composition of the two kernels computes the same thing the long way (8NHV)
        scale = exact[i].abs().max().item()
        atol = (1e-5 if dtype == torch.float32 else 2e-2) * max(scale, 1e-6)
        assert_close(fused[i], composed[i], atol=atol, name=f"fused vs composed {name}")
    assert torch.all(fused[1][~mask] == 0), "masked tokens got a gradient"
    for name in ("clip_fraction", "mean_ratio", "approx_kl"):
        assert_close(
            fused[3][name], composed[3][name], atol=1e-5 if dtype == torch.float32 else 2e-2, name=name
        )
    assert (fused[3]["logprobs"][mask] <= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_upstream_scale_and_all_masked(backend):
    hidden, weight, targets, old, adv, mask, _, _ = make_problem(3, 8, 64, 1037, torch.float32)
    base = grads_of(
        lambda h, w: fused_grpo_loss(h, w, targets, old, adv, mask, backend=backend), hidden, weight
    )
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    loss, _ = fused_grpo_loss(h, w, targets, old, adv, mask, backend=backend)
    (-2.5 * loss).backward()
    assert_close(h.grad, -2.5 * base[1], atol=1e-6, name="scaled grad_hidden")
    assert_close(w.grad, -2.5 * base[2], atol=1e-6, name="scaled grad_weight")
    none = torch.zeros_like(mask)
    out = grads_of(
        lambda h, w: fused_grpo_loss(h, w, targets, old, adv, none, backend=backend), hidden, weight
    )
    assert out[0].item() == 0.0 and torch.all(out[1] == 0) and torch.all(out[2] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_never_materialises_n_by_v(backend):
    num_seqs, seq_len, hidden_size, vocab, chunk = 4, 32, 64, 1037, 16
    hidden, weight, targets, old, adv, mask, _, _ = make_problem(
        num_seqs, seq_len, hidden_size, vocab, torch.float32
    )
    hidden.requires_grad_()
    weight.requires_grad_()
    with LargestTensor() as mode:
        loss, _ = fused_grpo_loss(hidden, weight, targets, old, adv, mask, backend=backend, chunk_size=chunk)
        loss.backward()
    allowed = 4 * max(chunk * vocab, vocab * hidden_size)
    assert allowed < 4 * num_seqs * seq_len * vocab
    assert mode.largest <= allowed, f"a tensor of {mode.largest} bytes (> {allowed})"


def test_fused_validation():
    hidden, weight, targets, old, adv, mask, _, _ = make_problem(2, 4, 64, 100, torch.float32)
    with pytest.raises(ValueError, match="hidden"):
        fused_grpo_loss(hidden[:, :3], weight, targets, old, adv, mask)
    bad = targets.clone()
    bad[0, 0], mask[0, 0] = 100, True
    with pytest.raises(ValueError, match="targets"):
        fused_grpo_loss(hidden, weight, bad, old, adv, mask)


def test_no_rows_gives_zero_gradients():
    """The weight gradient is written by the first chunk's GEMM (not zero-filled first): with no rows
    at all it must still come back as zeros, whatever the allocator handed out."""
    torch.full((50, 16), float("nan"))  # freed at once: the next allocation of this size may reuse it
    hidden = torch.randn(0, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    empty = torch.zeros(0)
    loss, _ = fused_grpo_loss(
        hidden,
        weight,
        torch.zeros(0, dtype=torch.long),
        empty,
        empty,
        empty,
        max_new_tokens=4,
        backend="torch",
    )
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(weight.grad, torch.zeros_like(weight))
