"""Reusing the sampler's products in the training forward (a float32 CPU path).

In one SPICE iteration the sampler and the trainer run the same weights: the rollout generates with
them and the single policy update that follows differentiates them, nothing changes in between. The
training forward over a token therefore computes the very products (q, k, v, o, gate, up, down of
every layer) that the prefill which read it (a prompt token) or the decode step which fed it (a
completion token) computed. ``ActivationRecord`` keeps them: the engine's C++ decode step copies each
recorded row's GEMM outputs into it (``csrc/ops/decode_layers.cpp``), and prefill and the Python
decode path copy them from ``Linear.forward`` under ``recording(...)``. Prompt rows are keyed by
``prefix_keys``, so a prefix that later requests read from the engine's prefix cache is found again.
The update's forward (``CausalLM.forward_hidden(..., replay=...)``) takes those rows from the record
instead of multiplying again (``replay_linear``), while everything else (norms, RoPE, attention,
SwiGLU, the residual stream, the LM head and every backward product) runs as before. On
bench_step's iteration every one of the 3,239 forwarded rows is replayed, which skips the layers'
forward GEMMs: about a third of the update's work.

The values differ from a recomputation only by float32 rounding (the decode step's GEMM and
attention kernels against the training ones: the same functions, other summation orders), which
tests/test_replay.py bounds; the gradient is the full product's, for every row.

Layout: ``data[layer, row]`` holds ``width(config)`` floats, the seven products in the order of
``PRODUCTS``; ``filled[row]`` says that every product of the row was written (rows of sequences that
stopped early, or that a preempted sequence prefilled again, stay unfilled and are computed).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from spice_fast.model.config import ModelConfig

PRODUCTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def product_columns(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """Each product's columns [start, end) in a record row."""
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    h, i = config.hidden_size, config.intermediate_size
    sizes = dict(zip(PRODUCTS, (q, kv, kv, h, i, i, h), strict=True))
    out, start = {}, 0
    for name in PRODUCTS:
        out[name] = (start, start + sizes[name])
        start += sizes[name]
    return out


def width(config: ModelConfig) -> int:
    """Floats per recorded row and layer."""
    return max(end for _, end in product_columns(config).values())


def record_bytes(config: ModelConfig, num_rows: int) -> int:
    return config.num_layers * num_rows * width(config) * 4


class ActivationRecord:
    """Room for ``num_rows`` rows' products in every layer: decode rows handed out per sequence by
    ``reserve``, prompt rows per prefix key by ``prompt_row``. ``storage``: a float32 buffer of at
    least that size to use (the engine keeps one across iterations, so its pages are mapped once,
    ``Engine.activation_record``); without it the memory is reserved, not touched, and rows never
    written cost no pages."""

    def __init__(self, config: ModelConfig, num_rows: int, storage: torch.Tensor | None = None):
        if num_rows <= 0:
            raise ValueError(f"ActivationRecord: num_rows must be positive, got {num_rows}")
        self.config = config
        self.width = width(config)
        shape = (config.num_layers, num_rows, self.width)
        if storage is None:
            self.data = torch.empty(shape, dtype=torch.float32)
        else:
            if storage.dtype != torch.float32 or storage.dim() != 1 or storage.numel() < math.prod(shape):
                raise ValueError(
                    f"ActivationRecord: storage must be a flat float32 tensor of at least {math.prod(shape)} "
                    f"elements, got {storage.dtype} {tuple(storage.shape)}"
                )
            self.data = storage[: math.prod(shape)].view(shape)
        self.filled = torch.zeros(num_rows, dtype=torch.bool)
        self._next = 0
        self._base: dict[object, tuple[int, int]] = {}  # key -> (first row, rows)
        self._prompt: dict[object, int] = {}  # prompt token key (prefix_keys) -> row

    @property
    def num_rows(self) -> int:
        return self.data.shape[1]

    def retire(self) -> None:
        """Forget every row (its storage is being handed to a new record): sequences that still
        point here are computed, never given another record's rows."""
        self._base.clear()
        self._prompt.clear()
        self.filled.zero_()
        self._next = self.num_rows

    def reserve(self, key: object, rows: int) -> bool:
        """Rows for the decode inputs 0..rows-1 of the sequence ``key``; False when full or taken."""
        if key in self._base or self._next + rows > self.num_rows:
            return False
        self._base[key] = (self._next, rows)
        self._next += rows
        return True

    def row(self, key: object, index: int) -> int:
        """The record row of the ``index``-th decode input of ``key`` (its ``index``-th generated
        token), or -1 when it has none."""
        base = self._base.get(key)
        if base is None or not 0 <= index < base[1]:
            return -1
        return base[0] + index

    def prompt_row(self, key: object) -> int:
        """The record row of the prompt token ``key`` (``prefix_keys``): the one it has, else a new one
        while there is room, else -1."""
        row = self._prompt.get(key)
        if row is None:
            if self._next >= self.num_rows:
                return -1
            row = self._prompt[key] = self._next
            self._next += 1
        return row

    def filled_prompt_rows(self, keys: list[object]) -> list[int]:
        """The filled record rows of these prompt tokens (-1 where none)."""
        rows = [self._prompt.get(k, -1) for k in keys]
        hits = [r for r in rows if r >= 0]
        if not hits:
            return rows
        filled = dict(zip(hits, self.filled[hits].tolist(), strict=True))
        return [r if r >= 0 and filled[r] else -1 for r in rows]

    def rows(self, key: object, count: int) -> list[int]:
        """The filled record rows of the first ``count`` decode inputs of ``key`` (-1 where none)."""
        base = self._base.get(key)
        if base is None:
            return [-1] * count
        first, n = base
        filled = self.filled[first : first + min(count, n)].tolist()
        return [first + j if ok else -1 for j, ok in enumerate(filled)] + [-1] * max(0, count - n)


def prefix_keys(tokens: list[int], end: int) -> list[tuple[int, int]]:
    """A key per prompt position t < ``end``: (t, a hash chained over tokens[0..t]). A token's layer
    products depend on exactly these tokens, so equal keys share a record row (the documents that
    several challenger prompts share, prefilled once by the engine's prefix cache)."""
    out, h = [], 0
    for t in range(end):
        h = hash((h, tokens[t]))
        out.append((t, h))
    return out


@dataclass
class Recording:
    """A forward's rows to record (a prefill, or a decode step through the Python layers): row i's
    products go to ``record`` row ``rows[i]`` (-1: not recorded); ``Linear.forward`` copies them inside
    ``recording(...)``, which marks the rows filled at the end if every product was written."""

    record: ActivationRecord
    rows: torch.Tensor  # [N] int64
    source: torch.Tensor = field(init=False)  # rows of the batch that are recorded
    target: torch.Tensor = field(init=False)  # their record rows
    kept: set[tuple[int, int]] = field(init=False, default_factory=set)  # (layer, column) of products written

    def __post_init__(self) -> None:
        self.source = (self.rows >= 0).nonzero().flatten()
        self.target = self.rows[self.source]

    def keep(self, layer: int, start: int, end: int, y: torch.Tensor) -> None:
        if y.dim() == 2 and y.shape[0] == self.rows.shape[0]:
            self.record.data[layer, :, start:end].index_copy_(0, self.target, y.index_select(0, self.source))
            self.kept.add((layer, start))

    @property
    def complete(self) -> bool:
        """Every product of every layer was written."""
        return len(self.kept) == len(PRODUCTS) * self.record.config.num_layers

    def finish(self) -> None:
        """Mark the rows filled, if the forward wrote all their products (else they stay computed)."""
        if self.complete:
            self.record.filled[self.target] = True


_recording: list[Recording | None] = [None]


@contextlib.contextmanager
def recording(rec: Recording | None):
    """Within the block, the model's ``Linear`` layers that know their record columns copy the
    recorded rows of their output into ``rec.record``."""
    previous = _recording[0]
    _recording[0] = rec
    try:
        yield
    finally:
        _recording[0] = previous
    if rec is not None:
        rec.finish()


def active_recording() -> Recording | None:
    return _recording[0]


@dataclass
class Replay:
    """One packed forward's rows to take from ``record``: packed row ``taken[j]`` is record row
    ``record_rows[j]``; ``computed`` are the other packed rows."""

    record: ActivationRecord
    taken: torch.Tensor  # [T] int64
    record_rows: torch.Tensor  # [T] int64
    computed: torch.Tensor  # [N - T] int64

    @classmethod
    def from_rows(cls, record: ActivationRecord, rows: list[int]) -> Replay | None:
        """``rows[i]``: the record row of packed row i, or -1; None when no row is recorded."""
        index = torch.tensor(rows, dtype=torch.int64)
        hit = index >= 0
        if not bool(hit.any()):
            return None
        taken = hit.nonzero().flatten()
        return cls(record, taken, index[taken], (~hit).nonzero().flatten())


_active: list[Replay | None] = [None]


@contextlib.contextmanager
def replaying(replay: Replay | None):
    """Within the block, the model's ``Linear`` layers that know their record columns take the
    ``replay``'s rows from the record (``Linear.forward``)."""
    previous = _active[0]
    _active[0] = replay
    try:
        yield
    finally:
        _active[0] = previous


def active() -> Replay | None:
    return _active[0]
