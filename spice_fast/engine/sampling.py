"""Token sampling for the engine: greedy, temperature, top-k, top-p, with keyed randomness.

Each sampled token takes one uniform number derived from a hash of (request seed, sample index,
position) and inverts the CDF of its (filtered) distribution. So a seeded request draws the same
tokens whatever else is in the batch, and a preempted sequence that is recomputed draws the same
tokens again. One uniform per row, rather than Gumbel noise over the whole vocabulary: on a 2-core
CPU, keyed Gumbel noise for 64 rows x 49k tokens cost 90-450 ms per decode step, more than the
model's own GEMMs; the inverse CDF costs one exp pass and a two-level search (chunk sums, then a
cumulative sum over one chunk), with no division when T = 1 and no argmax without greedy rows; top-k
and top-p sets are looked for among the 1,024 most likely tokens before any full sort.

Two paths draw the same tokens: ``sample_tokens_ref`` in torch (any device, the definition of correct)
and, for float32 CPU logits, the C++ kernel of ``csrc/ops/sampling.cpp`` (``spice_fast._cpu_ops``):
one pass per row on the threads of torch's pool, the top-p / top-k set bounded by sums over distance
bands below the maximum (or a histogram) instead of a ``topk``. On SmolLM2's logits (32 rows x 49k
tokens, T = 0.7, top-p 0.95: the cpu-tiny preset) it takes 1.2 ms against the torch path's 4.9 ms,
drawing the same tokens (benches/bench_sampling.py). Switch: ``backend=`` per call or
``SPICE_FAST_SAMPLER=auto|cpp|torch``. A row without a finite logit or with a NaN (a diverged
model) draws token 0 with a NaN logprob on both paths, never an exception. Tests:
tests/test_sampling.py.

The returned logprob is ``log_softmax(logits / T)`` over the full vocabulary at the chosen token
(not renormalised by top-k / top-p), the quantity the trainer recomputes. Greedy rows (T = 0) report
``log_softmax(logits)``.
"""

from __future__ import annotations

import torch

from spice_fast.kernels._utils import cpu_ops, pick_cpp_backend, plain_cpu_float32

_M64 = 0xFFFFFFFFFFFFFFFF


def _mix64(x: int) -> int:
    # splitmix64 finaliser on Python ints: spreads (seed, sample, position) over 64 bits.
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


def row_key(seed: int, sample: int, position: int) -> int:
    """A 64-bit key for one sampled token."""
    return _mix64(_mix64(_mix64(seed & _M64) ^ sample) ^ position)


def key_uniform(key: int) -> float:
    """A uniform number in [0, 1) with 53 random bits, from a row key."""
    return (_mix64(key) >> 11) * (1.0 / (1 << 53))


def sample_tokens(
    logits: torch.Tensor,  # [B, V] float32
    temperatures: list[float],
    top_ps: list[float],
    top_ks: list[int],
    keys: list[int],
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B] int64, logprobs [B] float32
    """One token per row and its logprob; ``backend``: ``"cpp"``, ``"torch"`` or ``None`` (the
    ``SPICE_FAST_SAMPLER`` variable, default ``auto``: the C++ kernel for float32 CPU logits when built)."""
    choice = pick_cpp_backend(backend, "SPICE_FAST_SAMPLER")
    if choice == "cpp" and logits.dim() == 2 and plain_cpu_float32(logits) and logits.numel() > 0:
        return _sample_tokens_cpp(logits, temperatures, top_ps, top_ks, keys)
    return sample_tokens_ref(logits, temperatures, top_ps, top_ks, keys)


def _sample_tokens_cpp(
    logits: torch.Tensor, temperatures: list[float], top_ps: list[float], top_ks: list[int], keys: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = logits.shape
    stride = logits.stride(0)  # 0: one row expanded to all
    x = logits if logits.stride(1) == 1 and (stride >= vocab or stride == 0) else logits.contiguous()
    temps = torch.tensor(temperatures, dtype=torch.float32)
    ps = torch.tensor(top_ps, dtype=torch.float32)
    ks = torch.tensor(top_ks, dtype=torch.int64)
    us = torch.tensor([key_uniform(k) for k in keys], dtype=torch.float32)
    tokens = torch.empty(rows, dtype=torch.int64)
    logprobs = torch.empty(rows, dtype=torch.float32)
    cpu_ops().sample_rows(
        x.data_ptr(), x.stride(0), rows, vocab, temps.data_ptr(), ps.data_ptr(), ks.data_ptr(), us.data_ptr(),
        tokens.data_ptr(), logprobs.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return tokens, logprobs


def sample_tokens_ref(
    logits: torch.Tensor,  # [B, V] float32
    temperatures: list[float],
    top_ps: list[float],
    top_ks: list[int],
    keys: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:  # tokens [B] int64, logprobs [B] float32
    """The torch path, on any device: the definition of correct for the C++ kernel."""
    device = logits.device
    scaled = logits.float()
    if any(t not in (0.0, 1.0) for t in temperatures):
        temps = torch.tensor([t if t > 0 else 1.0 for t in temperatures], dtype=torch.float32, device=device)
        scaled = scaled / temps[:, None]
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [B, 1]
    bad = ~torch.isfinite(lse)  # a NaN logit or no finite one (garbage from a diverged model)
    any_bad = bool(bad.any())
    if any_bad:
        # drawn from zeros (any valid token), then reported as token 0 with a NaN logprob
        scaled, lse = scaled.masked_fill(bad, 0.0), lse.masked_fill(bad, 0.0)
        logits = logits.masked_fill(bad, 0.0)
    greedy = [t == 0 for t in temperatures]
    if all(greedy):
        tokens = logits.argmax(dim=-1)
    else:
        u = torch.tensor([key_uniform(k) for k in keys], dtype=torch.float32, device=device)[:, None]
        filtered = [k > 0 or p < 1.0 for k, p in zip(top_ks, top_ps, strict=True)]
        if not any(filtered):
            tokens = _inverse_cdf(torch.sub(scaled, lse).exp_(), u)
        elif all(filtered):
            tokens = _sample_filtered(scaled, lse, top_ks, top_ps, u)
        else:  # a mixed batch: each kind of row its own way
            tokens = torch.empty(len(keys), dtype=torch.long, device=device)
            is_filtered = torch.tensor(filtered, device=device)
            rows, plain = is_filtered.nonzero().squeeze(1), (~is_filtered).nonzero().squeeze(1)
            tokens[plain] = _inverse_cdf(torch.sub(scaled[plain], lse[plain]).exp_(), u[plain])
            ks, ps = [top_ks[i] for i in rows.tolist()], [top_ps[i] for i in rows.tolist()]
            tokens[rows] = _sample_filtered(scaled[rows], lse[rows], ks, ps, u[rows])
        if any(greedy):
            tokens = torch.where(torch.tensor(greedy, device=device), logits.argmax(dim=-1), tokens)
    logprobs = (scaled.gather(1, tokens[:, None]) - lse).squeeze(1)
    if any_bad:
        bad = bad.squeeze(1)
        tokens, logprobs = tokens.masked_fill(bad, 0), logprobs.masked_fill(bad, float("nan"))
    return tokens, logprobs


_CHUNK = 1024  # vocabulary columns per chunk of the two-level inverse-CDF search
_CANDIDATES = (64, 1024)  # top tokens searched in turn for a top-k / top-p set before the whole vocabulary


def _sample_filtered(
    scaled: torch.Tensor,
    lse: torch.Tensor,
    top_ks: list[int],
    top_ps: list[float],
    u: torch.Tensor,
    num: int | None = None,
) -> torch.Tensor:
    """Inverse-CDF draws from the top-k / top-p sets of the rows (every logit outside a row's top-k and
    top-p nucleus dropped, at least one kept), found among the ``num`` most likely tokens.

    A nucleus almost always lies among the first few dozen or thousand tokens, so ``topk`` of the
    candidates replaces a sort of the whole vocabulary (on a CPU the sort cost more than the model's
    decode step; ``topk`` of 64 of 49k columns costs a fifth of ``topk`` of 1,024). Rows whose set
    reaches past the candidates are drawn again among the next number of ``_CANDIDATES``, then over
    the whole vocabulary.
    """
    rows, vocab = scaled.shape
    device = scaled.device
    num = num or min(vocab, max([_CANDIDATES[0], *top_ks]))
    values, order = scaled.topk(num, dim=-1)  # sorted, largest first
    k = torch.tensor([kk if 0 < kk < vocab else vocab for kk in top_ks], device=device)[:, None]
    p = torch.tensor(top_ps, dtype=torch.float32, device=device)[:, None]
    keep = torch.arange(num, device=device)[None, :] < k
    # probabilities within the top-k set (the whole vocabulary when there is no top-k)
    norm = torch.where(k < vocab, torch.logsumexp(values.masked_fill(~keep, float("-inf")), -1, True), lse)
    probs = torch.exp(values - norm).masked_fill(~keep, 0.0)
    mass = probs.cumsum(-1)
    keep &= mass - probs < p  # keep tokens until the kept mass reaches p
    keep[:, 0] = True
    tokens = order.gather(1, _inverse_cdf(probs.masked_fill(~keep, 0.0), u)[:, None]).squeeze(1)
    beyond = ((k == vocab) & (mass[:, -1:] < p)).squeeze(1)  # the set may hold more than the candidates
    if bool(beyond.any()) and num < vocab:
        again = beyond.nonzero().squeeze(1)
        ks, ps = [top_ks[i] for i in again.tolist()], [top_ps[i] for i in again.tolist()]
        larger = min(vocab, next((c for c in _CANDIDATES if c > num), vocab))
        tokens[again] = _sample_filtered(scaled[again], lse[again], ks, ps, u[again], num=larger)
    return tokens


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the token where the cumulative mass first exceeds ``u`` times the row's total mass.

    Two levels, so no ``[B, V]`` cumulative sum is built: chunk sums and their cumulative sum pick the
    chunk, then a cumulative sum over that one chunk picks the token. The pick always has mass > 0.
    """
    rows, vocab = probs.shape
    full = vocab // _CHUNK * _CHUNK
    sums = [probs[:, :full].reshape(rows, -1, _CHUNK).sum(-1)] if full else []
    if full < vocab:
        sums.append(probs[:, full:].sum(-1, keepdim=True))
    chunk_mass = torch.cat(sums, dim=1) if len(sums) > 1 else sums[0]  # [B, chunks]
    cdf = chunk_mass.cumsum(-1)
    total = cdf[:, -1:]
    # Strictly below the total, so the search never runs past the last chunk with mass.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    chunk = _last_with_mass(torch.searchsorted(cdf, target, right=True), chunk_mass)  # [B, 1]
    before = torch.where(chunk > 0, cdf.gather(1, (chunk - 1).clamp_min(0)), 0.0)
    cols = chunk * _CHUNK + torch.arange(_CHUNK, device=probs.device)  # [B, CHUNK]
    local = torch.where(cols < vocab, probs.gather(1, cols.clamp_max(vocab - 1)), 0.0)
    pick = torch.searchsorted(local.cumsum(-1), target - before, right=True)
    return (chunk * _CHUNK + _last_with_mass(pick, local)).squeeze(1)


def _last_with_mass(index: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    # A search that rounding pushed past the last entry with mass lands on that entry instead.
    positions = torch.arange(mass.shape[1], device=mass.device)
    last = torch.where(mass > 0, positions, -1).amax(dim=1, keepdim=True)
    return torch.minimum(index, last)
