"""The rollout engine: ``Engine(model, tokenizer).generate(prompts, SamplingParams(...))``."""

from spice_fast.engine.block_pool import BlockPool
from spice_fast.engine.engine import Engine, EngineStats
from spice_fast.engine.params import Completion, RequestOutput, SamplingParams

__all__ = ["BlockPool", "Completion", "Engine", "EngineStats", "RequestOutput", "SamplingParams"]
