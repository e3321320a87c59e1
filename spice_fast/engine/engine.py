"""The rollout engine: paged KV cache, shared prompt prefill, continuous batching, keyed sampling.

``Engine(model, tokenizer, ...)`` allocates the KV pool once; ``generate(prompts, params)`` runs
over the model's own parameter tensors (a trainer's in-place updates are seen by the next call,
with no copy). Per call:

* A request with ``n`` samples is prefilled once. Its full prompt blocks are shared by all ``n``
  children (reference counts); the partial last block is copied per child (copy-on-write). All
  children draw their first token from the one prefill logits row, each with its own noise.
* Waiting requests join while blocks and sequence slots are free; finished sequences leave at once
  and free their blocks. When a decode step finds no free block, the most recently admitted
  sequence is preempted: its blocks are freed and it is recomputed later from its tokens, drawing
  the same tokens again (the sampling noise is keyed by seed, sample and position).
* Prefix caching within a call: the full prompt blocks a prefill computes are kept (keyed by their
  tokens and the block before them), so a later request that starts with the same blocks (the
  challenger prompts of one document with different answer types) prefills only the rest, attending
  to the cached blocks. The cache lets go of its blocks whenever the pool runs short.
* The KV pool is emptied at the start of every call: KV written before a weight update is stale.

tests/test_engine.py checks greedy output against transformers, logprobs against a full forward,
prefix sharing on the allocator's counts, seeded reproducibility, pool exhaustion and weight updates.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from spice_fast.engine.block_pool import BlockPool
from spice_fast.engine.params import Completion, RequestOutput, SamplingParams
from spice_fast.engine.sampling import row_key, sample_tokens
from spice_fast.model import AttentionBatch, CausalLM, PagedKVCache
from spice_fast.model.cpu_decode import DecodeRecordRows
from spice_fast.model.replay import ActivationRecord, Recording, prefix_keys, recording
from spice_fast.model.replay import width as replay_width

logger = logging.getLogger(__name__)

_DEFAULT_CPU_KV_BYTES = 4 * 1024**3
_DEFAULT_GPU_KV_FRACTION = 0.5


@dataclass
class _Sequence:
    request: int  # index of the request in the call
    sample: int  # index of this completion within the request
    prompt_len: int
    tokens: list[int]  # prompt + generated
    seed: int
    params: SamplingParams
    logprobs: list[float] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # block table
    num_cached: int = 0  # tokens whose K/V are in the pool
    finish_reason: str | None = None
    text: str = ""

    @property
    def output(self) -> list[int]:
        return self.tokens[self.prompt_len :]


@dataclass
class EngineStats:
    num_prefill_tokens: int = 0  # tokens run through prefill (shared prompts counted once)
    num_generated_tokens: int = 0
    num_cached_prompt_tokens: int = 0  # prompt tokens read from blocks cached by an earlier request
    num_preemptions: int = 0
    num_steps: int = 0
    peak_blocks_used: int = 0


class Engine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer=None,
        *,
        max_num_seqs: int = 256,
        max_model_len: int = 4096,
        block_size: int = 16,
        kv_cache_gb: float | None = None,
        max_num_batched_tokens: int | None = None,
        enable_prefix_caching: bool = True,
    ):
        if not isinstance(model, CausalLM):
            raise TypeError(f"model: expected a spice_fast CausalLM, got {type(model).__name__}")
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_model_len", max_model_len),
            ("block_size", block_size),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kv_cache_gb is not None and not kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be positive, got {kv_cache_gb!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_num_seqs, self.max_model_len, self.block_size = max_num_seqs, max_model_len, block_size
        self.max_num_batched_tokens = max_num_batched_tokens or max(max_model_len, 8192)
        config = model.config
        block_bytes = PagedKVCache.bytes_per_block(config, block_size, model.dtype)
        wanted = max_num_seqs * -(-max_model_len // block_size)
        if kv_cache_gb is not None:
            num_blocks = int(kv_cache_gb * 1024**3 // block_bytes)
        else:
            if model.device.type == "cuda":
                budget = int(torch.cuda.mem_get_info(model.device)[0] * _DEFAULT_GPU_KV_FRACTION)
            else:
                budget = _DEFAULT_CPU_KV_BYTES
            num_blocks = min(wanted, budget // block_bytes)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_gb={kv_cache_gb} holds no block of {block_bytes} bytes")
        self.cache = PagedKVCache.allocate(config, num_blocks, block_size, model.dtype, model.device)
        self.pool = BlockPool(num_blocks)
        self.stats = EngineStats()
        self.enable_prefix_caching = enable_prefix_caching
        self._prefix_cache: dict[tuple[int, tuple[int, ...]], int] = {}  # (previous block, tokens) -> block
        self._record: tuple[ActivationRecord, object] | None = None  # generate's, while it runs
        self._record_storage: torch.Tensor | None = None  # activation_record's buffer, kept
        self._last_record: ActivationRecord | None = None
        self._stop_ids = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self._stop_ids.add(tokenizer.eos_token_id)

    @property
    def stop_token_ids(self) -> list[int]:
        """The model's EOS tokens, which end a completion unless ``ignore_eos``."""
        return sorted(self._stop_ids)

    def activation_record(self, num_rows: int) -> ActivationRecord:
        """A record of ``num_rows`` rows (prompt and decode) for ``generate(..., record=...)`` over a
        buffer the engine keeps (grown when too small), so that each iteration does not page-fault a
        fresh one in; the record handed out before is retired (its rows are forgotten, never reused)."""
        need = self.model.config.num_layers * num_rows * replay_width(self.model.config)
        if self._last_record is not None:
            self._last_record.retire()
            self._last_record = None
        if self._record_storage is None or self._record_storage.numel() < need:
            self._record_storage = None  # let the old buffer go first
            # a quarter more than asked: the next iterations' prompts may be a little longer, and
            # each new buffer's pages fault in again (rows never used are never touched)
            with torch.inference_mode(False):  # a normal tensor: the update reads it under autograd
                self._record_storage = torch.empty(need + need // 4, dtype=torch.float32)
        with torch.inference_mode(False):
            self._last_record = ActivationRecord(self.model.config, num_rows, self._record_storage)
        return self._last_record

    @property
    def kv_cache_bytes(self) -> int:
        return 2 * self.cache.k.numel() * self.cache.k.element_size()

    # ---- public API ----

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str] | list[list[int]] | str,
        params: SamplingParams | list[SamplingParams] | None = None,
        *,
        progress: bool = False,
        record: ActivationRecord | None = None,
        record_tag: object = None,
    ) -> list[RequestOutput]:
        """``record``: prefill and decode steps copy the layer products of every sequence whose key
        ``(record_tag, request, sample)`` has rows reserved in it (``ActivationRecord.reserve``; the
        prompt's when its request's first sample has them), for a training forward under the same
        weights to reuse (spice_fast.model.replay)."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        if not isinstance(prompts, list | tuple) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings or token-id lists")
        params_list = self._params_per_prompt(params, len(prompts))
        outputs, groups = [], deque()
        for i, (prompt, sp) in enumerate(zip(prompts, params_list, strict=True)):
            ids = self._encode(i, prompt)
            self._check_fits(i, len(ids), sp)
            outputs.append(RequestOutput(i, prompt if isinstance(prompt, str) else None, ids))
            seed = sp.seed if sp.seed is not None else random.getrandbits(63)
            seqs = [_Sequence(i, s, len(ids), list(ids), seed, sp) for s in range(sp.n)]
            groups.append(seqs)
        self.pool.reset()
        self._prefix_cache = {}
        self.stats = EngineStats()
        self._record = (record, record_tag) if record is not None else None
        try:
            finished = self._run(groups, sum(len(g) for g in groups), progress)
        finally:
            self._record = None
        for seq in sorted(finished, key=lambda s: (s.request, s.sample)):
            outputs[seq.request].outputs.append(
                Completion(seq.sample, seq.output, seq.text, seq.logprobs, seq.finish_reason)
            )
        self.stats.peak_blocks_used = self.pool.peak_used
        self.pool.reset()
        self._prefix_cache = {}
        return outputs

    # ---- validation ----

    def _params_per_prompt(self, params, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        if (
            isinstance(params, list | tuple)
            and len(params) == count
            and all(isinstance(p, SamplingParams) for p in params)
        ):
            return list(params)
        raise ValueError(f"params must be a SamplingParams or a list of {count} SamplingParams")

    def _encode(self, index: int, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    f"prompt {index} is a string but the engine has no tokenizer; pass token ids"
                )
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not all(isinstance(t, int) for t in ids):
                raise ValueError(f"prompt {index} must be a string or a list of ints")
        vocab = self.model.config.vocab_size
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt {index} has token ids outside [0, {vocab})")
        return ids

    def _check_fits(self, index: int, prompt_len: int, sp: SamplingParams) -> None:
        if sp.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; use stop_token_ids with token-id prompts")
        if prompt_len >= self.max_model_len:
            raise ValueError(f"prompt {index} has {prompt_len} tokens, max_model_len is {self.max_model_len}")
        total = min(prompt_len + sp.max_tokens, self.max_model_len)
        needed = -(-total // self.block_size)
        if needed > self.pool.num_blocks:
            raise ValueError(
                f"request {index} needs {total} tokens ({needed} blocks of {self.block_size}) but the pool "
                f"holds {self.pool.num_blocks} blocks ({self.pool.num_blocks * self.block_size} tokens); "
                "raise kv_cache_gb or lower max_tokens"
            )

    # ---- scheduling loop ----

    def _run(self, waiting: deque, total: int, progress: bool) -> list[_Sequence]:
        running: list[_Sequence] = []
        finished: list[_Sequence] = []
        bar = tqdm(total=total, desc="generate", unit="seq", disable=not progress, leave=False)
        while waiting or running:
            admitted = self._admit(waiting, running)
            if not admitted and waiting and self._prefix_cache:
                self._drop_prefix_cache()  # its blocks may be what the next request needs
                admitted = self._admit(waiting, running)
            if admitted:
                done = self._prefill(admitted, running)
            elif running:
                done = self._decode(running, waiting)
            else:  # nothing fits and nothing runs: cannot happen after _check_fits
                raise RuntimeError("scheduler stalled with an empty pool")
            self.stats.num_steps += 1
            for seq in done:
                running.remove(seq)
                self.pool.release(seq.blocks)
                seq.blocks = []
                finished.append(seq)
            bar.update(len(done))
        bar.close()
        return finished

    def _admit(self, waiting: deque, running: list[_Sequence]) -> list[list[_Sequence]]:
        """Take groups from the front of the queue while their prompt blocks and slots are free."""
        admitted, budget, free = [], self.max_num_batched_tokens, self.pool.num_free
        num_running = len(running)
        computed = set()  # first uncached block of each admitted group: this step's prefill computes it
        while waiting:
            group = waiting[0]
            length = len(group[0].tokens)
            first = self._first_uncached_key(group[0].tokens)
            if admitted and first is not None and first in computed:
                break  # it shares blocks with a group prefilled now: next step, it reads them from the cache
            full, partial = divmod(length, self.block_size)
            per_child = 1 if partial else 0
            slots = self.max_num_seqs - num_running
            if slots <= 0 or (admitted and length > budget):
                break
            fit = len(group) if per_child == 0 else (free - full) // per_child
            k = min(len(group), slots, fit)
            idle = num_running == 0 and not admitted
            # Keep one block of headroom per admitted child unless the pool would otherwise sit idle.
            while k > 0 and not idle and full + k * per_child + k > free:
                k -= 1
            if k <= 0 or full + k * per_child > free:
                break
            take = group[:k]
            if k == len(group):
                waiting.popleft()
            else:
                waiting[0] = group[k:]
            admitted.append(take)
            computed.add(first)
            free -= full + k * per_child
            budget -= length
            num_running += k
        return admitted

    def _block_key(self, previous: int, tokens: list[int], i: int) -> tuple[int, tuple[int, ...]]:
        """Prefix-cache key of full block ``i``: its tokens and the (cached) block before it."""
        return (previous, tuple(tokens[i * self.block_size : (i + 1) * self.block_size]))

    def _first_uncached_key(self, tokens: list[int]) -> tuple[int, tuple[int, ...]] | None:
        """Prefix-cache key of the prompt's first full block that a later prompt could read from the
        cache but the cache lacks (None: no such block). Two prompts with the same key share every block
        up to it, cached ones included, so the second can wait for the first to cache this one."""
        if not self.enable_prefix_caching:
            return None
        cached = self._cached_blocks(tokens)
        if len(cached) >= (len(tokens) - 1) // self.block_size:
            return None
        return self._block_key(cached[-1] if cached else -1, tokens, len(cached))

    def _cached_blocks(self, tokens: list[int]) -> list[int]:
        """The longest run of cached blocks this prompt starts with (at least one token left to run)."""
        found, previous = [], -1
        for i in range((len(tokens) - 1) // self.block_size if self.enable_prefix_caching else 0):
            block = self._prefix_cache.get(self._block_key(previous, tokens, i))
            if block is None:
                break
            found.append(block)
            previous = block
        return found

    def _cache_prompt_blocks(self, tokens: list[int], blocks: list[int]) -> None:
        if not self.enable_prefix_caching:
            return
        previous = -1
        for i in range(len(tokens) // self.block_size):
            key = self._block_key(previous, tokens, i)
            if key not in self._prefix_cache:
                self._prefix_cache[key] = blocks[i]
                self.pool.share([blocks[i]])  # the cache's own reference
            previous = self._prefix_cache[key]

    def _drop_prefix_cache(self) -> None:
        self.pool.release(list(self._prefix_cache.values()))
        self._prefix_cache = {}

    def _prefill(self, groups: list[list[_Sequence]], running: list[_Sequence]) -> list[_Sequence]:
        device = self.model.device
        bs = self.block_size
        lens, ids, slots, owned, contexts, positions = [], [], [], [], [], []
        for group in groups:
            tokens = group[0].tokens
            cached = self._cached_blocks(tokens)
            self.pool.share(cached)
            blocks = cached + self.pool.allocate(-(-len(tokens) // bs) - len(cached))
            context = len(cached) * bs
            owned.append(blocks)
            contexts.append(context)
            lens.append(len(tokens) - context)
            ids.extend(tokens[context:])
            positions.extend(range(context, len(tokens)))
            slots.extend(blocks[p // bs] * bs + p % bs for p in range(context, len(tokens)))
        slot_mapping = torch.tensor(slots, dtype=torch.int64, device=device)
        batch = AttentionBatch.packed(lens, device, slot_mapping=slot_mapping)
        if any(contexts):
            batch.positions = torch.tensor(positions, dtype=torch.int64, device=device)
            batch.uniform_len = 0
            batch.prefix_lens, batch.prefix_tables = contexts, owned
        with recording(self._prompt_record_rows(groups, contexts)):
            hidden = self.model.forward_hidden(
                torch.tensor(ids, dtype=torch.long, device=device), batch, self.cache
            )
        logits = self.model.logits(hidden[batch.cu_seqlens[1:].long() - 1])  # [num_groups, V]
        self.stats.num_prefill_tokens += len(ids)
        self.stats.num_cached_prompt_tokens += sum(contexts)
        for group, blocks in zip(groups, owned, strict=True):
            self._cache_prompt_blocks(group[0].tokens, blocks)

        lens = [len(group[0].tokens) for group in groups]
        children, rows = [], []
        for g, (group, blocks) in enumerate(zip(groups, owned, strict=True)):
            length = lens[g]
            full = length // bs
            for c, seq in enumerate(group):
                if c == 0:
                    seq.blocks = blocks
                else:
                    self.pool.share(blocks[:full])
                    seq.blocks = blocks[:full]
                    if length % bs:
                        (copy,) = self.pool.allocate(1)
                        self.cache.k[:, copy] = self.cache.k[:, blocks[-1]]
                        self.cache.v[:, copy] = self.cache.v[:, blocks[-1]]
                        seq.blocks = seq.blocks + [copy]
                seq.num_cached = length
                children.append(seq)
                rows.append(g)
        running.extend(children)
        row_index = torch.tensor(rows, device=device)
        return self._sample_and_append(children, logits[row_index])

    def _decode(self, running: list[_Sequence], waiting: deque) -> list[_Sequence]:
        bs = self.block_size
        i = 0
        while i < len(running):  # give every sequence a slot for its next token, preempting if needed
            seq = running[i]
            if seq.num_cached // bs == len(seq.blocks):
                if self.pool.num_free == 0 and self._prefix_cache:
                    self._drop_prefix_cache()
                    continue
                if self.pool.num_free == 0:
                    self._preempt(running[-1], running, waiting)  # may be seq itself; then i is past it
                    continue
                seq.blocks.extend(self.pool.allocate(1))
            i += 1
        if not running:
            return []
        device = self.model.device
        positions = [seq.num_cached for seq in running]
        max_blocks = max(len(seq.blocks) for seq in running)
        tables = torch.tensor(
            [seq.blocks + [seq.blocks[-1]] * (max_blocks - len(seq.blocks)) for seq in running],
            dtype=torch.int32,
            device=device,
        )
        pos = torch.tensor(positions, dtype=torch.int64, device=device)
        slot = torch.tensor(
            [seq.blocks[p // bs] * bs + p % bs for seq, p in zip(running, positions, strict=True)],
            dtype=torch.int64,
            device=device,
        )
        batch = AttentionBatch.decode(pos, tables, (pos + 1).to(torch.int32), slot)
        tokens = torch.tensor([seq.tokens[-1] for seq in running], dtype=torch.long, device=device)
        record = self._record_rows(running)
        logits = self.model.logits(self.model.forward_hidden(tokens, batch, self.cache, record=record))
        for seq in running:
            seq.num_cached += 1
        return self._sample_and_append(list(running), logits)

    def _prompt_record_rows(self, groups: list[list[_Sequence]], contexts: list[int]) -> Recording | None:
        """The prefill's prompt rows to record: those of requests whose first sample has decode rows in
        ``generate``'s record, keyed by their prefix (``prefix_keys``) so that a prompt prefix that
        later requests read from the prefix cache is found again; generated tokens that a preempted
        sequence prefills again are not recorded."""
        if self._record is None:
            return None
        record, tag = self._record
        rows = []
        for group, context in zip(groups, contexts, strict=True):
            seq = group[0]
            end = len(seq.tokens)
            if record.row((tag, seq.request, seq.sample), 0) < 0:
                rows += [-1] * (end - context)
                continue
            keys = prefix_keys(seq.tokens, min(end, seq.prompt_len))[context:]
            rows += [record.prompt_row(k) for k in keys] + [-1] * (end - context - len(keys))
        if max(rows, default=-1) < 0:
            return None
        return Recording(record, torch.tensor(rows, dtype=torch.int64))

    def _record_rows(self, running: list[_Sequence]) -> DecodeRecordRows | None:
        """The step's rows of ``generate``'s record: each sequence's input is its generated token
        number ``num_cached - prompt_len``."""
        if self._record is None:
            return None
        record, tag = self._record
        rows = [record.row((tag, s.request, s.sample), s.num_cached - s.prompt_len) for s in running]
        if max(rows) < 0:
            return None
        return DecodeRecordRows(record, torch.tensor(rows, dtype=torch.int64))

    def _preempt(self, seq: _Sequence, running: list[_Sequence], waiting: deque) -> None:
        running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks, seq.num_cached = [], 0
        waiting.appendleft([seq])
        self.stats.num_preemptions += 1
        logger.debug("preempted request %d sample %d at %d tokens", seq.request, seq.sample, len(seq.tokens))

    def _sample_and_append(self, seqs: list[_Sequence], logits: torch.Tensor) -> list[_Sequence]:
        tokens, logprobs = sample_tokens(
            logits,
            [s.params.temperature for s in seqs],
            [s.params.top_p for s in seqs],
            [s.params.top_k for s in seqs],
            [row_key(s.seed, s.sample, len(s.tokens)) for s in seqs],
        )
        done = []
        for seq, tok, lp in zip(seqs, tokens.tolist(), logprobs.tolist(), strict=True):
            seq.tokens.append(tok)
            seq.logprobs.append(lp)
            self.stats.num_generated_tokens += 1
            if self._finished(seq, tok):
                done.append(seq)
        return done

    def _finished(self, seq: _Sequence, token: int) -> bool:
        sp = seq.params
        if sp.stop:  # decode only the sequences that can stop on a string
            text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in sp.stop) if i >= 0), default=-1)
            if cut >= 0:
                seq.text = text[:cut]
                seq.finish_reason = "stop"
                return True
        if (token in self._stop_ids and not sp.ignore_eos) or (
            sp.stop_token_ids and token in sp.stop_token_ids
        ):
            seq.finish_reason = "stop"
        elif len(seq.output) >= sp.max_tokens or len(seq.tokens) >= self.max_model_len:
            seq.finish_reason = "length"
        else:
            return False
        if self.tokenizer is not None:
            seq.text = self.tokenizer.decode(seq.output, skip_special_tokens=True)
        return True
