"""Sampling parameters and outputs of the rollout engine (vLLM-like surface)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt; the prompt is prefilled once and shared
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept, in (0, 1]
    top_k: int = 0  # keep the k most likely tokens; 0 = all
    max_tokens: int = 256  # new tokens per completion
    stop: list[str] | None = None  # stop strings (need a tokenizer); excluded from the text
    stop_token_ids: list[int] | None = None  # extra stop tokens besides EOS; kept in token_ids
    seed: int | None = None  # seeded requests give the same tokens whatever else is batched
    ignore_eos: bool = False  # keep generating past the model's EOS tokens

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")


@dataclass
class Completion:
    index: int  # sample index within its request, 0..n-1
    token_ids: list[int]  # generated tokens (a stop token is kept)
    text: str  # decoded text without special tokens, cut before a stop string; "" without tokenizer
    logprobs: list[float]  # log_softmax(logits / T) of each generated token over the full vocabulary
    finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"


@dataclass
class RequestOutput:
    request_id: int  # position of the prompt in the call
    prompt: str | None  # the prompt text when a string was given
    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)
