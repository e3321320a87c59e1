"""SPICE rewards and role-specific Dr. GRPO advantages (../shared/SPICE.md).

* Reasoner: 1 when its boxed answer matches the gold answer (``spice_fast.match``), else 0; no
  ``\\boxed{}`` / ``\\fbox{}`` in the response means 0.
* Challenger, valid task: ``exp(-(p(1-p) - 0.25)^2 / (2 * 0.01))`` with p the reasoners' pass rate;
  invalid task: ``rho = -0.1``.
* Advantages: reward minus the mean of its group, each role over its own groups only (challenger
  groups are the G samples of a document, reasoner groups the K answers to a question).
"""

from __future__ import annotations

import math

import torch

from spice_fast import match
from spice_fast.kernels import grpo_advantages
from spice_fast.match import has_box

INVALID_REWARD = -0.1  # rho: below the reward of every valid task
_TARGET_VARIANCE = 0.25  # p(1-p) at p = 1/2, the frontier of the reasoner
_WIDTH = 0.01  # sigma^2 of the Gaussian on the variance


def challenger_reward(num_correct: int, num_samples: int) -> float:
    """The Gaussian reward of a valid task whose reasoner got ``num_correct`` of ``num_samples`` right."""
    if num_samples <= 0 or not 0 <= num_correct <= num_samples:
        raise ValueError(f"need 0 <= num_correct <= num_samples > 0, got {num_correct} of {num_samples}")
    p = num_correct / num_samples
    return math.exp(-((p * (1 - p) - _TARGET_VARIANCE) ** 2) / (2 * _WIDTH))


def reasoner_rewards(responses: list[str], golds: list[str], answer_types: list[str | None]) -> list[float]:
    """1.0 / 0.0 per response; the matcher runs in one batch over all cores."""
    if not len(responses) == len(golds) == len(answer_types):
        raise ValueError(
            f"responses, golds and answer_types differ in length: {len(responses)}, {len(golds)}, "
            f"{len(answer_types)}"
        )
    boxed = [isinstance(r, str) and has_box(r) for r in responses]
    verdicts = match.verify_batch([r if isinstance(r, str) else "" for r in responses], golds, answer_types)
    return [1.0 if ok and box else 0.0 for ok, box in zip(verdicts, boxed, strict=True)]


def role_advantages(
    challenger_rewards: list[float],
    challenger_groups: list[int],
    reasoner_rewards: list[float],
    reasoner_groups: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO advantages per role: each role is centred on its own groups only."""
    c = grpo_advantages(
        torch.tensor(challenger_rewards, dtype=torch.float32),
        torch.tensor(challenger_groups, dtype=torch.long),
    )
    r = grpo_advantages(
        torch.tensor(reasoner_rewards, dtype=torch.float32), torch.tensor(reasoner_groups, dtype=torch.long)
    )
    return c, r
