"""spice_fast as a backend of other trainers: light imports, and the TRL integration
(``spice_fast.integrations.trl``: the answer-matcher reward function in TRL's calling convention,
``SpiceGRPOTrainer``'s per-token log-probabilities against TRL's own method, its GRPO loss through
``policy_loss`` against TRL's ``_compute_loss`` per loss type (value, parameter gradients, logged metrics,
and the per-token gradient against TRL's loss in fp64), the configurations that fall back to TRL's loss,
one training step).

CPU, about 40 s. The TRL tests skip themselves when trl is not installed.
Run: python -m pytest -q tests/test_integrations.py
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_close, assert_error_rule
from tiny_models import byte_tokenizer, hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )


# ---------------------------------------------------------------- imports


def test_kernels_import_is_light_and_work_on_plain_tensors():
    code = """
import sys
import torch
import spice_fast.kernels as k
import spice_fast.integrations
heavy = [m for m in ("spice_fast.engine", "spice_fast.train", "transformers", "trl") if m in sys.modules]
assert not heavy, heavy
g = torch.Generator().manual_seed(0)
hidden = torch.randn(37, 16, generator=g, requires_grad=True)
weight = torch.randn(1000 + 37, 16, generator=g, requires_grad=True)
targets = torch.randint(0, 1037, (37,), generator=g)
logp = k.fused_linear_logprob(hidden, weight, targets, temperature=0.7)
ref = k.fused_linear_logprob_ref(hidden, weight, targets, temperature=0.7)
assert (logp - ref).abs().max() < 1e-5
mask = torch.ones(1, 37, dtype=torch.bool)
adv = torch.tensor([0.5])
loss, _ = k.policy_loss(logp.unsqueeze(0), logp.detach().unsqueeze(0), adv, mask)
loss.backward()
assert hidden.grad.abs().sum() > 0 and weight.grad.abs().sum() > 0
heavy = [m for m in ("spice_fast.engine", "spice_fast.train", "transformers", "trl") if m in sys.modules]
assert not heavy, heavy
print("ok")
"""
    out = run_python(code)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_trl_integration_without_trl_says_how_to_install():
    out = run_python("import sys; sys.modules['trl'] = None; import spice_fast.integrations.trl")
    assert out.returncode != 0
    assert "ImportError" in out.stderr and "pip install trl" in out.stderr, out.stderr


# ---------------------------------------------------------------- reward function


def test_answer_reward_trl_calling_convention():
    pytest.importorskip("trl")
    from spice_fast.integrations.trl import answer_reward

    extra = dict(prompts=["p"] * 4, completion_ids=[[1]] * 4, trainer_state=None, log_extra=print)
    plain = ["so \\boxed{4}", "The answer is 5.", "\\boxed{\\frac{1}{2}}", "no answer"]
    assert answer_reward(completions=plain, answer=["4", "4", "0.5", "3"], **extra) == [1.0, 0.0, 1.0, 0.0]

    chat = [[{"role": "assistant", "content": c}] for c in plain]
    assert answer_reward(completions=chat, answer=["4", "4", "0.5", "3"], **extra) == [1.0, 0.0, 1.0, 0.0]
    # a tool-calling turn: the last assistant message is read; content parts; a bare tool call
    multi = [
        {"role": "assistant", "content": "\\boxed{1}"},
        {"role": "tool", "content": "\\boxed{4}"},
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "so "}, {"type": "text", "text": "\\boxed{4}"}],
        },
    ]
    assert answer_reward(
        completions=[multi, [{"role": "assistant", "content": None}]], answer=["4", "4"]
    ) == [
        1.0,
        0.0,
    ]

    # columns: full solutions reduced to their final answer, numbers, per-row types, missing golds
    sols = ["work\n#### 72", "so \\boxed{5}"]
    assert answer_reward(completions=["\\boxed{72}", "\\boxed{5}"], solution=sols) == [1.0, 1.0]
    assert answer_reward(completions=["\\boxed{72}", "72"], answer=[72, 71.0]) == [1.0, 0.0]
    got = answer_reward(
        completions=["\\boxed{B}", "\\boxed{7}"], answer=["B", "7"], answer_type=["mcq", "integer"]
    )
    assert got == [1.0, 1.0]
    assert answer_reward(completions=["\\boxed{1}", "\\boxed{2}"], answer=[None, "2"]) == [None, 1.0]

    with pytest.raises(TypeError, match="gold answers"):
        answer_reward(completions=["x"], prompts=["p"])
    with pytest.raises(ValueError, match="length"):
        answer_reward(completions=["x"], answer=["1", "2"])
    with pytest.raises(TypeError, match="completions\\[0\\]"):
        answer_reward(completions=[3], answer=["1"])


# ---------------------------------------------------------------- SpiceGRPOTrainer


def count_kernel_calls(monkeypatch) -> list:
    """Counts the calls of spice_fast's fused head made through the integration."""
    import spice_fast.integrations.trl as integration

    calls = []
    real = integration.fused_linear_logprob
    monkeypatch.setattr(integration, "fused_linear_logprob", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def count_loss_calls(monkeypatch) -> list:
    """Counts the calls of spice_fast's policy_loss made through the integration."""
    import spice_fast.integrations.trl as integration

    calls = []
    real = integration.policy_loss
    monkeypatch.setattr(integration, "policy_loss", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def make_trainer(tmp_path, reward_funcs, **config):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    from spice_fast.integrations.trl import SpiceGRPOTrainer

    model = hf_model("qwen2", tied=True, eos_token_id=258, bos_token_id=257, pad_token_id=256)
    tokenizer = byte_tokenizer()
    tokenizer.pad_token = "<unk>"
    dataset = Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3=", "4+4="], "answer": ["2", "4", "6", "8"]})
    config.setdefault("bf16", False)
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        seed=0,
        **config,
    )
    return SpiceGRPOTrainer(
        model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer
    )


def padded_batch(vocab: int, seed: int = 0):
    """3 sequences: prompts left-padded, completions right-padded, one row with a single completion token."""
    g = torch.Generator().manual_seed(seed)
    prompt_len, num_keep = 7, 9
    ids = torch.randint(3, vocab, (3, prompt_len + num_keep), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding of the prompt
    mask[1, prompt_len + 5 :] = 0  # completion of 5 tokens
    mask[2, :1] = 0
    mask[2, prompt_len + 1 :] = 0  # completion of 1 token
    ids = ids.masked_fill(mask == 0, 256)
    return ids, mask, num_keep


def test_logprobs_equal_trl_method(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    calls = count_kernel_calls(monkeypatch)
    trainer = make_trainer(
        tmp_path, lambda completions, **kw: [0.0] * len(completions), temperature=0.7, max_completion_length=9
    )
    model = trainer.model
    ids, mask, num_keep = padded_batch(model.config.vocab_size)

    def logprobs(method):
        model.zero_grad()
        logps, entropies, aux = method(
            trainer, model, ids, mask, num_keep, batch_size=2, compute_entropy=True
        )
        g = torch.Generator().manual_seed(1)
        (logps * torch.randn(logps.shape, generator=g) + 0.1 * entropies.sum()).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        return logps.detach(), entropies.detach(), aux, grads

    ours = logprobs(type(trainer)._get_per_token_logps_and_entropies)
    assert len(calls) == 2  # batch_size=2 over 3 rows
    theirs = logprobs(GRPOTrainer._get_per_token_logps_and_entropies)
    assert ours[0].shape == theirs[0].shape == (3, num_keep)
    assert ours[2] is None and theirs[2] is None
    assert_close(ours[0], theirs[0], atol=1e-5, name="logps")
    assert_close(ours[1], theirs[1], atol=1e-5, name="entropies")
    assert (ours[0][mask[:, -num_keep:] == 0] == 0).all()
    for name, grad in theirs[3].items():
        scale = grad.abs().max().item()
        assert_close(ours[3][name], grad, atol=1e-5 * max(scale, 1.0), name=f"grad {name}")


def test_logprobs_under_bf16_autocast(tmp_path):
    """bf16 autocast: the head's GEMM takes bf16 inputs. spice_fast's CPU path keeps the logits in fp32, so
    it matches fp64 on the same bf16 inputs; TRL's rounds its logits to bf16 (as both do on a GPU)."""
    pytest.importorskip("trl")
    from spice_fast.kernels._utils import pick_backend
    from trl import GRPOTrainer

    if pick_backend(None, torch.empty(0)) != "torch":
        pytest.skip("the fp32-logits claim is the PyTorch path's (SPICE_FAST_KERNELS forces Triton here)")
    trainer = make_trainer(
        tmp_path, lambda completions, **kw: [0.0] * len(completions), bf16=True, temperature=0.7
    )
    model = trainer.model
    ids, mask, num_keep = padded_batch(model.config.vocab_size)
    with torch.no_grad():
        ours, _, _ = type(trainer)._get_per_token_logps_and_entropies(trainer, model, ids, mask, num_keep)
        theirs, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, model, ids, mask, num_keep)
        with trainer.accelerator.autocast():
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state[:, -num_keep - 1 : -1]
        logits = hidden.bfloat16().double() @ model.lm_head.weight.bfloat16().double().T / 0.7
        exact = torch.log_softmax(logits, -1).gather(-1, ids[:, -num_keep:, None]).squeeze(-1)
    keep = mask[:, -num_keep:].bool()
    assert_close(ours[keep], exact[keep], atol=1e-5, name="ours vs fp64")
    assert_close(theirs[keep], exact[keep], atol=0.1, name="TRL vs fp64")  # bf16 logits: |z| * 2^-8


def test_unsupported_heads_are_refused():
    pytest.importorskip("trl")
    from spice_fast.integrations.trl import add_spice_lm_head

    model = hf_model("qwen2", tied=True, final_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        add_spice_lm_head(model)


def test_training_step_updates_parameters(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from spice_fast.integrations.trl import answer_reward

    calls = count_kernel_calls(monkeypatch)
    loss_calls = count_loss_calls(monkeypatch)

    def distinct_bytes(completions, **kwargs):  # differs between the two samples, so advantages are non-zero
        return [float(len(set(c))) for c in completions]

    trainer = make_trainer(
        tmp_path,
        [answer_reward, distinct_bytes],
        max_steps=1,
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=8,
        temperature=0.9,
        learning_rate=1e-2,
        gradient_checkpointing=False,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert calls, "the training step did not go through spice_fast's kernel"
    assert loss_calls, "the training step did not go through spice_fast's policy_loss"
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(changed) == len(before), sorted(set(before) - set(changed))
    logged = trainer.state.log_history[0]
    assert "rewards/answer_reward/mean" in logged and logged["grad_norm"] > 0
    assert {"entropy", "clip_ratio/region_mean", "clip_ratio/high_max"} <= logged.keys()


# ---------------------------------------------------------------- SpiceGRPOTrainer's loss


def loss_inputs(trainer, seed: int = 0) -> dict:
    """The keys TRL's ``_compute_loss`` reads, off-policy enough that both clip bounds bind."""
    ids, mask, num_keep = padded_batch(trainer.model.config.vocab_size, seed)
    with torch.no_grad():
        logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, num_keep)
    g = torch.Generator().manual_seed(seed + 1)
    completion_mask = mask[:, -num_keep:]
    # log(new / old) from -0.6 to 0.6 along each completion: ratios below 1 - eps and above 1 + eps
    log_ratio = torch.linspace(-0.6, 0.6, num_keep) + 0.05 * torch.randn(logps.shape, generator=g)
    return {
        "prompt_ids": ids[:, :-num_keep],
        "prompt_mask": mask[:, :-num_keep],
        "completion_ids": ids[:, -num_keep:],
        "completion_mask": completion_mask,
        "advantages": torch.tensor([1.3, -0.7, 0.4]),
        "num_items_in_batch": completion_mask.sum() * 2,  # the generation batch spans two micro-batches
        "old_per_token_logps": logps - log_ratio,
        "ref_per_token_logps": logps + 0.2 * torch.randn(logps.shape, generator=g),
        "sampling_per_token_logps": logps + 0.2 * torch.randn(logps.shape, generator=g),
        "importance_sampling_ratio": torch.exp(0.1 * torch.randn(logps.shape, generator=g)),
    }


def loss_grads_metrics(trainer, compute_loss, inputs, mode: str):
    model = trainer.model
    model.train(mode == "train")
    model.zero_grad(set_to_none=True)
    trainer._metrics[mode].clear()
    loss = compute_loss(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, dict(trainer._metrics[mode])


def loss_and_logp_grad(trainer, compute_loss, inputs, mode: str, dtype: torch.dtype):
    """The loss and d loss / d logps on fixed log-probabilities of ``dtype`` (the model is bypassed)."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    num_keep = inputs["completion_ids"].size(1)
    with torch.no_grad():
        logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, ids, mask, num_keep, compute_entropy=True
        )
    leaf = logps.to(dtype).requires_grad_()
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
    trainer.model.train(mode == "train")
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, entropies.to(dtype), None)
    try:
        loss = compute_loss(trainer, trainer.model, cast)
    finally:
        del trainer._get_per_token_logps_and_entropies
    loss.backward()
    return loss.detach(), leaf.grad


# name -> (GRPOConfig overrides, trainer attributes set after construction, train or eval). The loss reads
# beta and the vLLM switches from the trainer; a config with beta != 0 would load a reference model by name.
NO_KL_BIAS = dict(use_bias_correction_kl=False)
SWAPPED_LOSSES = {
    "grpo": (dict(loss_type="grpo"), {}, "train"),
    "bnpo": (dict(loss_type="bnpo", epsilon_high=0.28), {}, "train"),
    "dr_grpo": (dict(loss_type="dr_grpo", max_completion_length=16), {}, "train"),
    "dapo": (dict(loss_type="dapo", epsilon_high=0.28, steps_per_generation=4), {}, "train"),
    "dapo_eval": (dict(loss_type="dapo", steps_per_generation=4), {}, "eval"),
    "grpo_eval": (dict(loss_type="grpo"), {}, "eval"),
    "luspo_token": (dict(loss_type="luspo"), {}, "train"),
    "grpo_kl": (dict(loss_type="grpo", epsilon_high=0.28, **NO_KL_BIAS), dict(beta=0.04), "train"),
    "bnpo_kl": (dict(loss_type="bnpo", epsilon=0.1, **NO_KL_BIAS), dict(beta=0.1), "train"),
    "dr_grpo_kl": (dict(loss_type="dr_grpo", epsilon_high=0.28, **NO_KL_BIAS), dict(beta=0.1), "train"),
    "dapo_kl_masks_vllm": (
        dict(
            loss_type="dapo",
            epsilon=0.15,
            epsilon_high=0.3,
            top_entropy_quantile=0.5,
            off_policy_mask_threshold=0.01,
            **NO_KL_BIAS,
        ),
        dict(beta=0.1, use_vllm=True, vllm_importance_sampling_correction=True),
        "train",
    ),
}


@pytest.mark.parametrize("case", list(SWAPPED_LOSSES))
def test_loss_equals_trl(case, tmp_path, monkeypatch):
    """policy_loss computes the loss: value, gradients and logged metrics equal TRL's ``_compute_loss`` on
    the same inputs (both read the log-probabilities from the same fused head, so only the loss differs)."""
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    overrides, attributes, mode = SWAPPED_LOSSES[case]
    trainer = make_trainer(tmp_path, lambda completions, **kw: [0.0] * len(completions), **overrides)
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer.train(); TRL divides by it
    for name, value in attributes.items():
        setattr(trainer, name, value)
    assert trainer.spice_loss_fallback_reason() is None
    inputs = loss_inputs(trainer)
    calls = count_loss_calls(monkeypatch)
    ours = loss_grads_metrics(trainer, type(trainer)._compute_loss, inputs, mode)
    assert len(calls) == 1
    theirs = loss_grads_metrics(trainer, GRPOTrainer._compute_loss, inputs, mode)
    assert len(calls) == 1

    # fp32: the two differ in the rounding of the per-token gradient (checked against fp64 below), which the
    # model's backward then sums with cancellation; so the parameter gradients are compared as one vector.
    assert abs(ours[0].item() - theirs[0].item()) <= 1e-6 * abs(theirs[0].item()), (ours[0], theirs[0])
    assert all(g.abs().max() > 0 for g in theirs[1].values()), "a parameter got no gradient"
    diff = torch.cat([(ours[1][n] - g).flatten() for n, g in theirs[1].items()])
    full = torch.cat([g.flatten() for g in theirs[1].values()])
    assert diff.norm() <= 1e-6 * full.norm(), f"gradient differs by {(diff.norm() / full.norm()).item():.2e}"
    assert ours[2] == theirs[2]  # computed by TRL's definitions from the same detached tensors
    assert theirs[2]["clip_ratio/low_mean"][0] > 0 and theirs[2]["clip_ratio/high_mean"][0] > 0

    # per token, against TRL's loss in fp64 on the same log-probabilities (STYLE.md's error rule)
    exact = loss_and_logp_grad(trainer, GRPOTrainer._compute_loss, inputs, mode, torch.float64)
    trl32 = loss_and_logp_grad(trainer, GRPOTrainer._compute_loss, inputs, mode, torch.float32)
    ours32 = loss_and_logp_grad(trainer, type(trainer)._compute_loss, inputs, mode, torch.float32)
    assert len(calls) == 2
    assert_error_rule(ours32[0], trl32[0], exact[0], tiny=1e-7 * exact[0].abs().item(), name="loss")
    tiny = 1e-7 * exact[1].abs().max().item()
    assert_error_rule(ours32[1], trl32[1], exact[1], tiny=tiny, name="d loss / d logps")


# name -> (GRPOConfig overrides, trainer attributes set after construction, the reason's expected text)
FALLBACK_LOSSES = {
    "delta": (dict(loss_type="grpo", delta=1.5), {}, "delta"),
    "bias_corrected_kl": (dict(loss_type="dapo"), dict(beta=0.04), "use_bias_correction_kl"),
    "cispo": (dict(loss_type="cispo", epsilon_high=5.0), {}, "cispo"),
    "sapo": (dict(loss_type="sapo"), {}, "sapo"),
    "gspo": (dict(loss_type="grpo", importance_sampling_level="sequence"), {}, "importance_sampling"),
    "entropy_bonus": (dict(loss_type="dapo", entropy_coef=0.01), {}, "entropy bonus"),
}


@pytest.mark.parametrize("case", list(FALLBACK_LOSSES))
def test_unsupported_loss_falls_back_to_trl(case, tmp_path, monkeypatch, caplog):
    pytest.importorskip("trl")
    from trl import GRPOTrainer

    overrides, attributes, reason = FALLBACK_LOSSES[case]
    trainer = make_trainer(tmp_path, lambda completions, **kw: [0.0] * len(completions), **overrides)
    trainer.current_gradient_accumulation_steps = 1
    for name, value in attributes.items():
        setattr(trainer, name, value)
    inputs = loss_inputs(trainer)
    calls = count_loss_calls(monkeypatch)
    with caplog.at_level("WARNING", logger="spice_fast.integrations.trl"):
        type(trainer)._compute_loss(trainer, trainer.model, inputs)
        ours = loss_grads_metrics(trainer, type(trainer)._compute_loss, inputs, "train")  # logs nothing more
    theirs = loss_grads_metrics(trainer, GRPOTrainer._compute_loss, inputs, "train")
    assert not calls
    said = [r.getMessage() for r in caplog.records if "TRL's GRPO loss" in r.getMessage()]
    assert len(said) == 1 and reason in said[0], said
    assert torch.equal(ours[0], theirs[0])
    for name, grad in theirs[1].items():
        assert torch.equal(ours[1][name], grad), name
    assert ours[2] == theirs[2]


def test_spice_loss_opt_out(tmp_path, monkeypatch, caplog):
    pytest.importorskip("trl")
    from spice_fast.integrations.trl import SpiceGRPOTrainer

    trainer = make_trainer(tmp_path, lambda completions, **kw: [0.0] * len(completions))
    trainer.current_gradient_accumulation_steps = 1
    inputs = loss_inputs(trainer)
    calls = count_loss_calls(monkeypatch)
    trainer.spice_loss = False
    with caplog.at_level("WARNING", logger="spice_fast.integrations.trl"):
        theirs = loss_grads_metrics(trainer, SpiceGRPOTrainer._compute_loss, inputs, "train")
    assert not calls and not caplog.records
    trainer.spice_loss = True
    ours = loss_grads_metrics(trainer, SpiceGRPOTrainer._compute_loss, inputs, "train")
    assert len(calls) == 1
    assert abs(ours[0].item() - theirs[0].item()) <= 1e-6 * abs(theirs[0].item())
    with pytest.raises(TypeError, match="spice_loss"):
        SpiceGRPOTrainer(model=trainer.model, reward_funcs=[], args=trainer.args, spice_loss="no")
