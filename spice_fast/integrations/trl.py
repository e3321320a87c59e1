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

``SpiceGRPOTrainer`` is ``trl.GRPOTrainer`` with one method replaced,
``_get_per_token_logps_and_entropies``: the log-probabilities (and entropies) of the completion tokens
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

TRL's GRPO loss is left as it is. ``spice_fast.kernels.policy_loss`` computes the same clipped
objective for ``loss_type`` "grpo" / "bnpo" / "dr_grpo", but TRL's loss also carries DAPO's global token
normaliser, sequence-level importance sampling, two-sided clipping (``delta``), entropy masks and
bonuses, off-policy masks and vLLM importance weights; the loss is elementwise over ``[B, T]`` and
costs nothing next to the vocabulary GEMMs, so a swap would save no measurable time and could only
make some configuration differ.

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

from spice_fast.kernels import fused_linear_logprob
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
    """``trl.GRPOTrainer`` whose per-token log-probabilities come from ``spice_fast.kernels``.

    Same constructor and behaviour as ``GRPOTrainer``; see the module docstring for what changes and
    what is refused.
    """

    def __init__(self, *args, **kwargs):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise ValueError("SpiceGRPOTrainer: DeepSpeed ZeRO-3 is not supported (use trl.GRPOTrainer)")
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


__all__ = ["SpiceGRPOTrainer", "add_spice_lm_head", "answer_reward", "completion_logprobs"]
