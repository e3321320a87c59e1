"""spice_fast as a drop-in backend of TRL's GRPO trainer (tested with trl 1.16).

```python
from trl import GRPOConfig
from spice_fast.integrations.trl import SpiceGRPOTrainer, answer_reward

trainer = SpiceGRPOTrainer(model=model, reward_funcs=answer_reward, args=GRPOConfig(...),
                           train_dataset=dataset)  # a "prompt" column and an "answer" (or "solution") column
trainer.train()
```

``answer_reward`` is the C++ answer matcher (``spice_fast.match``) in TRL's reward-function convention:
1.0 when a completion's final answer matches the row's gold answer, 0.0 when not, ``None`` (TRL: not
applicable) when the row has no gold answer. ``trl.GRPOTrainer(reward_funcs=answer_reward)`` works too.

``SpiceGRPOTrainer`` is ``trl.GRPOTrainer`` with two methods replaced. In
``_get_per_token_logps_and_entropies`` the log-probabilities (and entropies) of the completion tokens
come from ``spice_fast.kernels.fused_linear_logprob`` on the model body's final hidden states, so no
``[B, T, V]`` logits tensor is built and only completion tokens (not prompt or padding) go through the
vocabulary GEMM. It is equivalent to TRL's method: the same temperature, the same ``logits_to_keep``
slice, the same ``-100`` labels from the attention mask, zeros at padded positions, the same
``batch_size`` chunking, the head in the autocast dtype (fp32 with ``cast_lm_head_to_fp32``), and the
kernel runs inside the model's forward (as TRL's own fused head does) so DDP / FSDP2 wrappers see it.
TRL >= 1.16 no longer builds full logits either (it has a chunked fused head); against it this path sends
only completion tokens through the GEMM on every device (TRL scores every position off CUDA / XPU),
reuses a smaller logits buffer, and keeps the head's logits in fp32 on the CPU under bf16 autocast.
Multimodal inputs and MoE auxiliary losses fall back to TRL's method, said once in the log. Models whose
logits are scaled or soft-capped, LM heads with a bias or a PEFT adapter, and DeepSpeed ZeRO-3 are refused
with a ``ValueError`` rather than computed differently.

The GRPO loss goes through ``spice_fast.kernels.policy_loss`` too (``_compute_loss`` is replaced): the
per-token clipped objective, the k3 KL term and the analytic gradient come from the kernel, and the same
metrics as TRL's are logged under the same names (``kl``, ``entropy``, ``clip_ratio/*``), computed from the
detached ratios as TRL computes them. ``loss_type`` maps onto ``policy_loss``'s aggregations, with TRL's
normalisers: "grpo" -> ``seq_mean_token_mean``, "bnpo" -> ``token_mean``, "dr_grpo" -> ``drgrpo`` over
``max_completion_length``, "dapo" -> the token sum over TRL's global ``num_items_in_batch`` normaliser, and
"luspo" (token-level ratios only) -> the token sum averaged over sequences; each is divided for gradient
accumulation as TRL divides it. ``epsilon`` / ``epsilon_high`` are the clip bounds, ``beta`` the KL
coefficient; the off-policy sequence mask (``off_policy_mask_threshold``), the high-entropy token mask
(``top_entropy_quantile``) and vLLM's importance-sampling ratios multiply the clipped term only, as in TRL,
so they travel as ``policy_loss``'s ``is_weights``. The loss and its gradient equal TRL's to fp32 rounding.
The loss is elementwise over ``[B, K]``: next to the vocabulary GEMMs the swap saves little time.
TRL's own loss runs, said once in the log with the reason, for what ``policy_loss`` cannot express:
``loss_type`` "cispo" / "sapo" / "vespo", sequence-level importance sampling
(``importance_sampling_level="sequence"``, so "luspo" as its paper sets it), two-sided clipping
(``delta``), a KL term weighted by the ratio (``use_bias_correction_kl=True``, TRL's default, with
``beta != 0``: set it to False to swap a KL-regularised loss), an entropy bonus (``entropy_coef`` /
``use_adaptive_entropy``), MoE router auxiliary losses, and ``epsilon`` outside ``[0, 1)``.
``SpiceGRPOTrainer(..., spice_loss=False)`` keeps TRL's loss for every configuration (the log-probabilities
still come from the fused head).

Tests: ``pytest tests/test_integrations.py``; benchmark: ``python benches/bench_trl.py``.
"""

from __future__ import annotations

import functools
import logging
import types
from collections.abc import Sequence

try:
    import trl
    from trl import GRPOTrainer
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError("spice_fast.integrations.trl needs TRL: pip install trl") from exc

import torch
from accelerate.utils import is_peft_model
from packaging.version import Version
from torch.distributed.tensor import DTensor
from trl.extras.profiling import profiling_decorator
from trl.trainer.utils import nanmax, nanmin

from spice_fast.kernels import fused_linear_logprob, policy_loss
from spice_fast.match import extract_answer
from spice_fast.match import reward_fn as _match_reward_fn

MIN_TRL = "1.16"
if Version(trl.__version__) < Version(MIN_TRL):
    raise ImportError(
        f"spice_fast.integrations.trl needs trl>={MIN_TRL} (found {trl.__version__}): pip install -U trl"
    )

log = logging.getLogger(__name__)

# Config fields that rescale or soft-cap the logits before the softmax; the fused head does neither.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier")

# TRL's loss types whose per-token term is -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) (+ beta * k3).
_CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")

# The inputs TRL's _compute_loss forwards to _get_per_token_logps_and_entropies besides the token ids.
_MULTIMODAL_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


# ---------------------------------------------------------------------------------------------------
# Reward function


def _completion_text(completion: object, index: int) -> str | bytes:
    # TRL passes decoded strings, or conversations: lists of {"role", "content"} messages whose content is
    # a string, a list of {"type": "text", "text": ...} parts, or None (a bare tool call).
    if isinstance(completion, str | bytes):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, list) and all(isinstance(m, dict) for m in completion):
        replies = [m for m in completion if m.get("role", "assistant") == "assistant"]
        if not replies:
            return ""
        content = replies[-1].get("content")
        if content is None:
            return ""
        if isinstance(content, str | bytes):
            return content
        if isinstance(content, list):
            return "".join(
                p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
            )
    got = type(completion).__name__
    raise TypeError(f"completions[{index}]: expected str, bytes or a list of messages, got {got}")


def _gold_text(gold: object, index: int) -> str | bytes | None:
    if gold is None:
        return None
    if isinstance(gold, int | float) and not isinstance(gold, bool):
        return str(gold)
    if isinstance(gold, str | bytes):
        # A full solution ("... #### 72", "... \boxed{5}") is reduced to its final answer; a bare one stays.
        extracted = extract_answer(gold)
        return gold if extracted is None else extracted
    raise TypeError(f"answer[{index}]: expected str, bytes, a number or None, got {type(gold).__name__}")


def answer_reward(
    completions: Sequence[object],
    answer: Sequence[object] | None = None,
    solution: Sequence[object] | None = None,
    answer_type: str | Sequence[str | None] | None = None,
    *,
    answers: Sequence[object] | None = None,
    num_threads: int = 0,
    **kwargs: object,
) -> list[float | None]:
    """TRL reward function: 1.0 when a completion's answer matches the row's gold answer, else 0.0.

    TRL calls it as ``answer_reward(prompts=..., completions=..., completion_ids=..., <dataset columns>,
    trainer_state=..., ...)``. The gold answers come from the ``answers``, ``answer`` or ``solution``
    column (the first present); a full solution is reduced to its final answer (``\\boxed{}``, ``####``),
    numbers are accepted, and a row whose gold is ``None`` gets ``None`` (TRL ignores it). ``answer_type``
    is a column (one type per row) or one type for all: "mcq", "integer", "expression", "string" or
    ``None`` (inferred). Completions are strings or conversations (the last assistant message is read).
    Other keyword arguments are ignored. The matching runs in C++ over ``num_threads`` threads
    (0 = all cores).
    """
    golds = next((g for g in (answers, answer, solution) if g is not None), None)
    if golds is None:
        raise TypeError(
            "answer_reward: no gold answers (a dataset column 'answer' or 'solution', or answers=)"
        )
    if isinstance(golds, str | bytes) or not isinstance(golds, Sequence):
        raise TypeError(f"answer: expected one gold answer per completion, got {type(golds).__name__}")
    if isinstance(completions, str | bytes) or not isinstance(completions, Sequence):
        raise TypeError(f"completions: expected a list, got {type(completions).__name__}")
    if len(golds) != len(completions):
        raise ValueError(f"answer: length {len(golds)} differs from completions length {len(completions)}")
    if answer_type is None or isinstance(answer_type, str):
        types_ = [answer_type] * len(completions)
    else:
        types_ = list(answer_type)
        if len(types_) != len(completions):
            raise ValueError(
                f"answer_type: length {len(types_)} differs from completions length {len(completions)}"
            )
    gold_texts = [_gold_text(g, i) for i, g in enumerate(golds)]
    rows = [i for i, g in enumerate(gold_texts) if g is not None]
    scores = _match_reward_fn(
        [_completion_text(completions[i], i) for i in rows],
        [gold_texts[i] for i in rows],
        answer_types=[types_[i] for i in rows],
        num_threads=num_threads,
    )
    out: list[float | None] = [None] * len(completions)
    for i, score in zip(rows, scores, strict=True):
        out[i] = score
    return out


# ---------------------------------------------------------------------------------------------------
# Fused LM head


def completion_logprobs(
    hidden: torch.Tensor,  # [B, T, H] final (normed) hidden states of prompt + completion
    lm_head: torch.nn.Module,  # weight [V, H], no bias
    labels: torch.Tensor,  # [B, K] completion tokens, -100 where ignored; K < T
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    cast_lm_head_to_fp32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # ([B, K] fp32, [B, K] fp32 | None), 0 where ignored
    """log p(label) under ``softmax(hidden @ W.T / temperature)`` for the last K positions, through
    ``fused_linear_logprob`` on the non-ignored rows only. The hidden state before each label predicts it."""
    num_keep = labels.shape[1]
    if not 0 < num_keep < hidden.shape[1]:
        raise ValueError(f"logits_to_keep must be in [1, {hidden.shape[1] - 1}], got {num_keep}")
    weight = lm_head.weight
    if isinstance(weight, DTensor):  # FSDP2 shards: gather once (differentiable), as TRL's head does
        weight = weight.full_tensor()
    hidden = hidden[:, -num_keep - 1 : -1].to(weight.device)  # [B, K, H]
    labels = labels.to(weight.device)
    mask = labels != -100  # [B, K]
    device_type = hidden.device.type
    if cast_lm_head_to_fp32:
        dtype = torch.float32
    elif torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    else:
        dtype = hidden.dtype
    # The kernel runs its own GEMMs on matching dtypes; autocast would recast them behind its back.
    with torch.autocast(device_type, enabled=False):
        out = fused_linear_logprob(
            hidden[mask].to(dtype),
            weight.to(dtype),
            labels[mask],
            temperature=temperature,
            return_entropy=return_entropy,
        )
    logp, entropy = out if return_entropy else (out, None)
    # masked_scatter keeps the result attached to the graph even when no label is valid
    logp = logp.new_zeros(mask.shape).masked_scatter(mask, logp)
    if entropy is not None:
        entropy = entropy.new_zeros(mask.shape).masked_scatter(mask, entropy)
    return logp, entropy


def _check_supported(model: torch.nn.Module) -> None:
    name = type(model).__name__
    config = model.config.get_text_config()
    for field in _LOGIT_TRANSFORMS:
        value = getattr(config, field, None)
        if value is not None and (field == "final_logit_softcapping" or value != 1.0):
            raise ValueError(f"{name}: config.{field}={value!r} is not supported by SpiceGRPOTrainer")
    if getattr(config, "logits_scaling", None) not in (None, 1.0):
        raise ValueError(f"{name}: config.logits_scaling={config.logits_scaling!r} is not supported")
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{name}: no output embedding (LM head) with a weight")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"{name}: an LM head with a bias is not supported by SpiceGRPOTrainer")
    if hasattr(head, "base_layer"):  # a PEFT adapter on the head: reading head.weight would skip it
        raise ValueError(f"{name}: an adapter on the LM head is not supported by SpiceGRPOTrainer")


def add_spice_lm_head(model: torch.nn.Module, *, cast_lm_head_to_fp32: bool = False) -> None:
    """Patch ``model.forward``: ``model(input_ids=..., attention_mask=..., spice_labels=labels [B, K],
    spice_temperature=t, spice_entropy=bool)`` runs the model body and returns ``completion_logprobs``'s
    ``(logp, entropy | None)``; without ``spice_labels`` the forward is the previous one (generation).
    The head runs inside the forward so that DDP / FSDP2 wrappers around the model see it."""
    _check_supported(model)
    previous_forward = model.forward

    @functools.wraps(type(model).forward)  # keeps the signature that `generate` checks its kwargs against
    def forward(self, *args, spice_labels=None, spice_temperature=1.0, spice_entropy=False, **kwargs):
        if spice_labels is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state  # [B, T, H]
        return completion_logprobs(
            hidden,
            self.get_output_embeddings(),
            spice_labels,
            temperature=spice_temperature,
            return_entropy=spice_entropy,
            cast_lm_head_to_fp32=cast_lm_head_to_fp32,
        )

    model.forward = types.MethodType(forward, model)


# ---------------------------------------------------------------------------------------------------
# Trainer


class SpiceGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probabilities and GRPO loss come from ``spice_fast.kernels``.

    Same constructor and behaviour as ``GRPOTrainer``, plus ``spice_loss`` (default True): False keeps
    TRL's loss. See the module docstring for what changes, what falls back and what is refused.
    """

    def __init__(self, *args, spice_loss: bool = True, **kwargs):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("SpiceGRPOTrainer: DeepSpeed ZeRO-3 is not supported (use trl.GRPOTrainer)")
        if not isinstance(spice_loss, bool):
            raise TypeError(f"spice_loss: expected a bool, got {type(spice_loss).__name__}")
        self.spice_loss = spice_loss
        self._spice_loss_fallback_logged = False
        super().__init__(*args, **kwargs)
        cast = bool(self.args.cast_lm_head_to_fp32)
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        add_spice_lm_head(policy, cast_lm_head_to_fp32=cast)
        if self.ref_model is not None:
            add_spice_lm_head(self.accelerator.unwrap_model(self.ref_model), cast_lm_head_to_fp32=cast)
        self._spice_fallback_logged = False

    @profiling_decorator
    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,  # [B, T] prompt + completion
        attention_mask,  # [B, T]
        logits_to_keep,  # K: the completion length
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # [B, K], [B, K] | None, None
        unsupported = [name for name, value in multimodal.items() if value is not None]
        if compute_aux_loss:
            unsupported.append("compute_aux_loss")
        if unsupported:
            if not self._spice_fallback_logged:
                log.warning("SpiceGRPOTrainer: %s given, using TRL's log-prob path", ", ".join(unsupported))
                self._spice_fallback_logged = True
            return super()._get_per_token_logps_and_entropies(
                model,
                input_ids,
                attention_mask,
                logits_to_keep,
                batch_size=batch_size,
                compute_entropy=compute_entropy,
                compute_aux_loss=compute_aux_loss,
                **multimodal,
            )
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids = input_ids[start : start + batch_size]
            mask = attention_mask[start : start + batch_size]
            labels = ids[:, -logits_to_keep:].masked_fill(mask[:, -logits_to_keep:] == 0, -100)
            with self.accelerator.autocast():
                logps, entropies = model(
                    input_ids=ids,
                    attention_mask=mask,
                    spice_labels=labels,
                    spice_temperature=self.temperature,
                    spice_entropy=compute_entropy,
                )
            all_logps.append(logps)
            all_entropies.append(entropies)
        logps = torch.cat(all_logps, dim=0)
        entropies = torch.cat(all_entropies, dim=0) if compute_entropy else None
        return logps, entropies, None

    def spice_loss_fallback_reason(self) -> str | None:
        """Why this configuration's loss is TRL's rather than ``policy_loss``'s; None when it is swapped."""
        if not self.spice_loss:
            return "spice_loss=False"
        if self.loss_type not in _CLIPPED_LOSS_TYPES:
            return f"loss_type={self.loss_type!r} is not the clipped objective policy_loss computes"
        if self.importance_sampling_level != "token":
            level = self.importance_sampling_level
            return f"importance_sampling_level={level!r} (policy_loss takes per-token ratios)"
        if self.args.delta is not None:
            return f"delta={self.args.delta} (two-sided clipping)"
        if self.beta != 0.0 and self.args.use_bias_correction_kl:
            return "use_bias_correction_kl=True with beta != 0 (a KL term weighted by the ratio)"
        if self._entropy_bonus_enabled:
            return "an entropy bonus (entropy_coef / use_adaptive_entropy)"
        if self.aux_loss_enabled:
            return "a MoE router auxiliary loss"
        if not (0.0 <= self.epsilon_low < 1.0 and self.epsilon_high >= 0.0):
            eps = (self.epsilon_low, self.epsilon_high)
            return f"epsilon={eps[0]}, epsilon_high={eps[1]} (policy_loss needs [0, 1) and >= 0)"
        return None

    def _compute_loss(self, model, inputs):
        reason = self.spice_loss_fallback_reason()
        if reason is not None:
            if self.spice_loss and not self._spice_loss_fallback_logged:
                log.warning("SpiceGRPOTrainer: %s, using TRL's GRPO loss", reason)
                self._spice_loss_fallback_logged = True
            return super()._compute_loss(model, inputs)

        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask  # [B, K]
        if "tool_mask" in inputs:
            mask = completion_mask * inputs["tool_mask"]
        logps, entropies, _ = self._get_per_token_logps_and_entropies(
            model,
            torch.cat([prompt_ids, completion_ids], dim=1),
            torch.cat([prompt_mask, completion_mask], dim=1),
            completion_ids.size(1),
            compute_entropy=True,
            **{key: inputs.get(key) for key in _MULTIMODAL_KEYS},
        )  # [B, K], [B, K]
        advantages = inputs["advantages"]  # [B] or [B, K]
        advantages_2d = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # [B, 1 | K]
        old = inputs.get("old_per_token_logps")
        old = logps.detach() if old is None else old  # [B, K]

        # TRL multiplies the clipped term (not the KL term) by these; all are constants for autograd.
        weights = []
        if self.top_entropy_quantile < 1.0:
            weights.append(self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile))
        if self.off_policy_mask_threshold is not None:
            sampling_logps = inputs.get("sampling_per_token_logps", old)
            threshold = self.off_policy_mask_threshold
            weights.append(self.get_off_policy_mask(advantages_2d, logps, sampling_logps, mask, threshold))
        if self.use_vllm and self.vllm_importance_sampling_correction:
            weights.append(inputs["importance_sampling_ratio"])  # [B, K] or [B, 1]
        is_weights = None
        if weights:
            is_weights = functools.reduce(torch.mul, [w.float() for w in weights]).expand(logps.shape)

        mode = "train" if self.model.training else "eval"
        # TRL divides for gradient accumulation in training only (eval batches are not accumulated)
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        num_seqs = logps.size(0)
        scale = 1.0 / accumulation
        if self.loss_type == "grpo":
            agg, max_new_tokens = "seq_mean_token_mean", None
        elif self.loss_type == "bnpo":
            agg, max_new_tokens = "token_mean", None
        elif self.loss_type == "dr_grpo":
            agg, max_new_tokens = "drgrpo", self.max_completion_length
        elif self.loss_type == "luspo":  # token sum per sequence, mean over sequences
            agg, max_new_tokens = "drgrpo", 1
        else:  # dapo: token sum over the global token count of one accumulation window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * accumulation / self.args.steps_per_generation
            agg, max_new_tokens, scale = "drgrpo", 1, num_seqs / normalizer
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        loss, _ = policy_loss(
            logps,
            old,
            advantages if advantages.dim() == 1 else advantages.expand(logps.shape),
            mask,
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            ref_logprobs=ref,
            kl_coef=self.beta,
            agg=agg,
            max_new_tokens=max_new_tokens,
            is_weights=is_weights,
        )
        loss = loss * scale
        with torch.no_grad():
            self._log_loss_metrics(mode, logps.detach(), old, ref, entropies.detach(), advantages_2d, mask)
        return loss

    def _log_loss_metrics(self, mode, logps, old, ref, entropies, advantages, mask) -> None:
        """TRL's loss metrics for the clipped loss types, by TRL's definitions (global over processes)."""
        metrics = self._metrics[mode]

        def global_masked_mean(x):
            local = torch.stack([(x * mask).sum(), mask.sum().float()])
            totals = self.accelerator.reduce(local, reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        def masked_seq_mean(x):  # NaN for a sequence without tokens; nanmin / nanmax skip it
            return (x * mask).sum(-1) / mask.sum(-1)

        if ref is not None:
            metrics["kl"].append(global_masked_mean(torch.exp(ref - logps) - (ref - logps) - 1))
        metrics["entropy"].append(global_masked_mean(entropies))
        ratio = torch.exp(logps - old)  # [B, K]
        low = ((ratio < 1 - self.epsilon_low) & (advantages < 0)).float()
        high = ((ratio > 1 + self.epsilon_high) & (advantages > 0)).float()
        metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
        metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
        metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
        metrics["clip_ratio/low_min"].append(nanmin(self.accelerator.gather(masked_seq_mean(low))).item())
        metrics["clip_ratio/high_max"].append(nanmax(self.accelerator.gather(masked_seq_mean(high))).item())


__all__ = ["SpiceGRPOTrainer", "add_spice_lm_head", "answer_reward", "completion_logprobs"]
