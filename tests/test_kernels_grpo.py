"""grpo_advantages and policy_loss vs their references: values, gradients, clipping, masking.

Triton kernels run under TRITON_INTERPRET=1 on a CPU (set by tests/conftest.py).
Run: python -m pytest -q tests/test_kernels_grpo.py
"""

import pytest
import torch
from helpers import assert_close, assert_error_rule
from spice_fast.kernels import grpo_advantages, grpo_advantages_ref, policy_loss, policy_loss_ref
from spice_fast.kernels._utils import interpreter_ready, triton_available

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_HERE = triton_available() and (DEVICE == "cuda" or interpreter_ready())
SKIP_TRITON = pytest.mark.skipif(
    not TRITON_HERE, reason="Triton needs a GPU or TRITON_INTERPRET=1 (set by tests/conftest.py)"
)
BACKENDS = ["torch", pytest.param("triton", marks=SKIP_TRITON)]
AGGS = ["drgrpo", "token_mean", "seq_mean_token_mean"]


# ---------------------------------------------------------------------------------------------------
# advantages


def test_advantages_dr_grpo_by_hand():
    # reasoner group 7: 2 of 4 correct; challenger group -3 (arbitrary id): SPICE rewards
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.823, 1.0, -0.1])
    groups = torch.tensor([7, 7, 7, 7, -3, -3, -3])
    adv = grpo_advantages(rewards, groups)
    mean_c = (0.823 + 1.0 - 0.1) / 3
    expected = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.823 - mean_c, 1.0 - mean_c, -0.1 - mean_c])
    assert_close(adv, expected, atol=1e-6, name="dr grpo advantages")


@pytest.mark.parametrize("scale_by_std", [False, True])
def test_advantages_match_reference(scale_by_std):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(200, generator=g)
    groups = torch.randint(-50, 10**9, (25,), generator=g)[torch.randint(0, 25, (200,), generator=g)]
    groups[0] = 123456789012  # a group of one: advantage 0, no NaN
    adv = grpo_advantages(rewards.to(DEVICE), groups.to(DEVICE), scale_by_std=scale_by_std)
    ref = grpo_advantages_ref(rewards.double(), groups, scale_by_std=scale_by_std)
    assert adv.dtype == torch.float32 and torch.isfinite(adv).all()
    assert_close(adv, ref, atol=1e-5, name="advantages")
    assert adv[0].item() == 0.0
    # each group is centred on its own mean
    for gid in groups.unique()[:5]:
        assert abs(adv[(groups == gid).to(DEVICE)].sum().item()) < 1e-4


def test_advantages_constant_group_with_std_is_zero():
    adv = grpo_advantages(torch.ones(8), torch.zeros(8, dtype=torch.long), scale_by_std=True)
    assert torch.equal(adv, torch.zeros(8))


def test_advantages_validation():
    with pytest.raises(ValueError, match="group_ids"):
        grpo_advantages(torch.ones(4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids"):
        grpo_advantages(torch.ones(4), torch.zeros(4))


# ---------------------------------------------------------------------------------------------------
# policy loss


def make_batch(num_seqs, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(num_seqs, seq_len, generator=g) * 4
    old = logp + torch.randn(num_seqs, seq_len, generator=g) * 0.3  # ratios both sides of the clip range
    adv = torch.randn(num_seqs, generator=g)
    mask = torch.rand(num_seqs, seq_len, generator=g) > 0.25
    mask[0] = False  # an all-masked sequence
    ref = logp + torch.randn(num_seqs, seq_len, generator=g) * 0.2
    isw = torch.rand(num_seqs, seq_len, generator=g) * 2
    return [t.to(DEVICE) for t in (logp, old, adv, mask, ref, isw)]


def run_loss(fn, logp, *args, **kw):
    lp = logp.detach().clone().requires_grad_()
    loss, metrics = fn(lp, *args, **kw)
    loss.backward()
    return loss, lp.grad, metrics


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("extras", [False, True])
def test_policy_loss_matches_reference(backend, dtype, agg, extras):
    logp, old, adv, mask, ref, isw = make_batch(6, 37)
    kw = dict(agg=agg, clip_low=0.2, clip_high=0.28)
    if extras:
        kw.update(ref_logprobs=ref, kl_coef=0.05, is_weights=isw, max_new_tokens=40)
    cast = lambda d: {k: (v.to(d) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    loss, grad, metrics = run_loss(
        policy_loss, logp.to(dtype), old.to(dtype), adv.to(dtype), mask, backend=backend, **cast(dtype)
    )
    same = run_loss(policy_loss_ref, logp.to(dtype), old.to(dtype), adv.to(dtype), mask, **cast(dtype))
    exact = run_loss(policy_loss_ref, logp.double(), old.double(), adv.double(), mask, **cast(torch.float64))
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    tiny = 1e-6 if dtype == torch.float32 else 1e-3
    assert_error_rule(loss, same[0], exact[0], tiny=tiny, name="loss")
    assert_error_rule(grad, same[1], exact[1], tiny=tiny, name="grad")
    assert torch.all(grad[~mask] == 0)
    for name in ("clip_fraction", "mean_ratio", "approx_kl"):
        assert_close(metrics[name], exact[2][name], atol=1e-5 if dtype == torch.float32 else 2e-2, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clipping_by_hand(backend):
    # r = e^0.5 > 1.2 with A > 0: clipped (no gradient); r = e^-0.5 < 0.8 with A < 0: clipped;
    # r = e^0.5 with A < 0: unclipped, gradient -A r / (B * T)
    logp = torch.zeros(1, 4, device=DEVICE)
    old = torch.tensor([[-0.5, 0.5, -0.5, 0.0]], device=DEVICE)
    adv = torch.tensor([[1.0, -1.0, -1.0, 2.0]], device=DEVICE)
    mask = torch.ones(1, 4, dtype=torch.bool, device=DEVICE)
    loss, grad, metrics = run_loss(policy_loss, logp, old, adv, mask, backend=backend)
    r = torch.tensor([0.5, -0.5, 0.5, 0.0]).exp()
    expected_terms = torch.tensor([-1.2, 0.8, r[2].item(), -2.0])  # -min(r A, clip(r) A)
    assert abs(loss.item() - expected_terms.sum().item() / 4) < 1e-6
    expected_grad = torch.tensor([[0.0, 0.0, r[2].item() / 4, -2.0 / 4]])
    assert_close(grad, expected_grad, atol=1e-6, name="grad")
    assert abs(metrics["clip_fraction"].item() - 0.5) < 1e-7


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("agg", AGGS)
def test_all_masked_and_garbage_in_masked_tokens(backend, agg):
    logp, old, adv, mask, ref, isw = make_batch(3, 9)
    mask = torch.zeros_like(mask)
    old = torch.full_like(old, float("inf"))  # masked positions may hold anything
    loss, grad, metrics = run_loss(
        policy_loss, logp, old, adv, mask, backend=backend, agg=agg, ref_logprobs=ref, kl_coef=0.1
    )
    assert loss.item() == 0.0 and torch.all(grad == 0)
    assert all(torch.isfinite(v).all() for v in metrics.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_inputs_and_scaled_upstream(backend):
    logp, old, adv, mask, _, _ = make_batch(8, 5)
    lp_t = logp.T.contiguous().T  # same values, column-major
    assert not lp_t.is_contiguous()
    lp = lp_t.detach().requires_grad_()
    loss, _ = policy_loss(lp, old.T.contiguous().T, adv, mask, backend=backend, agg="token_mean")
    (3.0 * loss).backward()
    exact = run_loss(policy_loss_ref, logp.double(), old.double(), adv.double(), mask, agg="token_mean")
    assert_close(lp.grad, 3.0 * exact[1], atol=1e-6, name="3 x grad")


def test_policy_loss_validation():
    logp, old, adv, mask, ref, _ = make_batch(2, 3)
    with pytest.raises(ValueError, match="agg"):
        policy_loss(logp, old, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="ref_logprobs"):
        policy_loss(logp, old, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(logp, old, adv[:1], mask)
    with pytest.raises(ValueError, match="mask"):
        policy_loss(logp, old, adv, mask[:, :2])
