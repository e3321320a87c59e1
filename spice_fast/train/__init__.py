"""The SPICE trainer: config, rollout (both roles), the fused GRPO update, checkpoints and logs.

``spice-fast train`` builds a ``TrainConfig`` (``config.py``) and runs ``Trainer`` (``trainer.py``); one
iteration is ``rollout.spice_rollout`` then ``update.policy_update``.
"""

from spice_fast.train.config import PRESETS, TrainConfig, make_config
from spice_fast.train.trainer import Trainer, resume_config

__all__ = ["PRESETS", "TrainConfig", "Trainer", "make_config", "resume_config"]
