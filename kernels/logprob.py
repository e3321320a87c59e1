"""Log-probabilities of chosen tokens straight from the final hidden state and the LM head.

``fused_linear_logprob(hidden, weight, targets)`` equals
``log_softmax(hidden @ weight.T / temperature).gather(-1, targets)`` (``fused_linear_logprob_ref``), with
the optional entropy of the same distribution, but never stores the [N, V] logits: rows are processed in
chunks, each chunk's [C, V] logits are made by one GEMM, reduced to a few numbers per row (log-prob,
log-sum-exp, 1 - p(target), entropy) and dropped. Backward recomputes the logits chunk by chunk, turns
them in place into dlogits and runs the two gradient GEMMs, so memory stays O(C * V + N) beyond the
inputs: over forward's row chunks, with the row statistics recomputed from the new logits, on a GPU and
for Triton (``_backward_row_chunks``); over vocabulary slices with a row-sum correction for the PyTorch
backend on a CPU (``_backward_vocab_slices``).

Two row backends share the chunk loops (switch in ``_utils.pick_backend``): a Triton kernel
(``_logprob_rows_kernel``, forward or backward by a constexpr, logits in the input dtype as cuBLAS
returns them, upcast to fp32 inside) and plain PyTorch (the CPU path, everything in fp32).

Numerics: temperature applied in fp32, out-of-range columns are -inf, 1 - p(target) is accumulated from
the other columns so a near-certain token keeps its gradient, and log p(target) of the row maximum uses
log1p so it does not round to 0. Tested by tests/test_kernels_logprob.py.
"""

from __future__ import annotations

import torch

from ._utils import default_block_v, default_chunk_rows, lazy_jit, pick_backend

tl = None  # triton.language, bound by _utils.lazy_jit at the first launch (keeps the import light)


def fused_linear_logprob_ref(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [N]
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
):
    """The definition of correct: full logits, log_softmax, gather. fp32 (fp64 for fp64 inputs) math."""
    compute = torch.promote_types(hidden.dtype, torch.float32)
    logits = (hidden @ weight.T).to(compute) / temperature  # [N, V]
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


# ---------------------------------------------------------------------------------------------------
# Triton row kernels: one program per row of a [C, V] logits chunk, looping over V in BLOCK_V columns.


@lazy_jit
def _logprob_rows_kernel(
    logits_ptr,
    stride_logits_row,
    targets_ptr,
    logp_ptr,
    max_ptr,
    log_s_ptr,
    omp_ptr,
    entropy_ptr,
    grad_logp_ptr,
    stride_grad_logp,
    grad_entropy_ptr,
    stride_grad_entropy,
    num_cols,
    inv_temperature,
    BLOCK_V: tl.constexpr,
    ENTROPY: tl.constexpr,
    GRAD: tl.constexpr,
):
    """One row: the log-softmax statistics in a first pass over the columns. Forward (GRAD False) stores
    them; backward (GRAD True) overwrites the row's recomputed logits with dloss/dlogits in a second pass,
    the 1/temperature factor included.

    Backward recomputes the statistics instead of reading forward's: a recomputed GEMM may differ from
    forward's in the last bit (cuBLAS picks other kernels for other shapes), and p_j from one set of
    logits with the normaliser of another no longer add up with 1 - p_t. From the same logits each row
    of the result sums to zero, as the exact gradient does."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_row
    target = tl.load(targets_ptr + row).to(tl.int64)
    z_t = tl.load(row_ptr + target).to(tl.float32) * inv_temperature
    m = float("-inf")
    s_other = 0.0  # sum of exp(z - m) over the columns other than the target
    s_all = 0.0
    acc = 0.0  # sum of exp(z - m) * (z - m), for the entropy
    for start in range(0, num_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        valid = cols < num_cols
        z = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z - m_new)
        s_other = alpha * s_other + tl.sum(tl.where(cols == target, 0.0, e), axis=0)
        if ENTROPY:
            shift = tl.where(s_all > 0, m - m_new, 0.0) * s_all  # 0, not -inf * 0, on the first block
            acc = alpha * (acc + shift) + tl.sum(e * tl.where(valid, z - m_new, 0.0), axis=0)
            s_all = alpha * s_all + tl.sum(e, axis=0)
        m = m_new
    s = tl.exp(z_t - m) + s_other
    log_s = tl.log(s)
    omp = s_other / s
    if ENTROPY:
        ent = tl.log(s_all) - acc / s_all
    if GRAD:
        g = tl.load(grad_logp_ptr + row * stride_grad_logp).to(tl.float32)
        if ENTROPY:
            g_ent = tl.load(grad_entropy_ptr + row * stride_grad_entropy).to(tl.float32)
        for start in range(0, num_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            valid = cols < num_cols
            z = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
            logp = (z - m) - log_s
            p = tl.exp(logp)
            # the target column: g (1 - p_t), not g - g p_t, which rounds to 0 when p_t ~ 1
            dz = tl.where(cols == target, g * omp, -g * p)
            if ENTROPY:
                # dH/dz_j = -p_j (log p_j + H)
                dz -= g_ent * p * tl.where(valid, logp + ent, 0.0)
            tl.store(row_ptr + cols, (dz * inv_temperature).to(logits_ptr.dtype.element_ty), mask=valid)
    else:
        # log1p(s_other) without libdevice: exact when 1 + s_other rounds to 1
        u = 1.0 + s_other
        log1p_other = tl.where(u == 1.0, s_other, tl.log(u) * s_other / tl.where(u == 1.0, 1.0, u - 1.0))
        tl.store(logp_ptr + row, tl.where(z_t == m, -log1p_other, (z_t - m) - log_s))
        # the shift is kept as (max, log-sum) rather than max + log-sum: for logits far from 0 their fp32
        # sum would round, and the CPU backward's p_j would no longer add up with 1 - p_t
        tl.store(max_ptr + row, m)
        tl.store(log_s_ptr + row, log_s)
        tl.store(omp_ptr + row, omp)
        if ENTROPY:
            tl.store(entropy_ptr + row, ent)


def logprob_rows_fwd(logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool):
    """Launcher: per-row (logp, max, log-sum-exp - max, 1 - p_target, entropy | None), all fp32 [C]."""
    num_rows, num_cols = logits.shape
    assert logits.stride(1) == 1 and targets.is_contiguous()
    out = torch.empty(5 if return_entropy else 4, num_rows, device=logits.device, dtype=torch.float32)
    if num_rows:
        _logprob_rows_kernel[(num_rows,)](
            logits, logits.stride(0), targets, out[0], out[1], out[2], out[3],
            out[4] if return_entropy else out[0], out[0], 0, out[0], 0, num_cols, 1.0 / temperature,
            BLOCK_V=default_block_v(num_cols), ENTROPY=return_entropy, GRAD=False,
        )  # fmt: skip
    return out[0], out[1], out[2], out[3], (out[4] if return_entropy else None)


def logprob_rows_grad(logits, targets, grad_logp, grad_entropy, temperature: float):
    """Launcher: overwrite recomputed ``logits`` [C, V] with dloss/dlogits (statistics recomputed from
    them). Upstream grads may be strided views; ``grad_entropy`` None skips the entropy term."""
    num_rows, num_cols = logits.shape
    assert logits.stride(1) == 1
    use_entropy = grad_entropy is not None
    if num_rows:
        g_ent = grad_entropy if use_entropy else grad_logp
        _logprob_rows_kernel[(num_rows,)](
            logits, logits.stride(0), targets, grad_logp, grad_logp, grad_logp, grad_logp, grad_logp,
            grad_logp, grad_logp.stride(0), g_ent, g_ent.stride(0), num_cols, 1.0 / temperature,
            BLOCK_V=default_block_v(num_cols), ENTROPY=use_entropy, GRAD=True,
        )  # fmt: skip
    return logits


# ---------------------------------------------------------------------------------------------------
# PyTorch row path (CPU): the same quantities, in fp32, in place where it saves a [C, V] buffer.


def _rows_fwd_torch(logits: torch.Tensor, targets: torch.Tensor, temperature: float, return_entropy: bool):
    """Per-row stats as ``logprob_rows_fwd``; overwrites ``logits`` (passes in place: no page faults)."""
    z = logits if logits.dtype == torch.float32 else logits.float()  # [C, V]
    if temperature != 1.0:
        z.div_(temperature)
    idx = targets.long().unsqueeze(-1)
    m = z.amax(-1, keepdim=True)
    z.sub_(m)  # z - m <= 0, exact
    z_t = z.gather(-1, idx).squeeze(-1)
    e = torch.exp(z) if return_entropy else z.exp_()  # [C, V] exp(z - m)
    # the other-columns mass without the target, so 1 - p_t keeps its small value
    e.scatter_(-1, idx, 0.0)
    s_other = e.sum(-1)
    e_t = torch.exp(z_t)
    s = e_t + s_other
    log_s = torch.log(s)
    logp = torch.where(z_t == 0, -torch.log1p(s_other), z_t - log_s)
    omp = s_other / s
    entropy = None
    if return_entropy:
        e.scatter_(-1, idx, e_t.unsqueeze(-1))
        entropy = log_s - torch.linalg.vecdot(e, z) / s
    return logp, m.squeeze(-1), log_s, omp, entropy


def _rows_bwd_torch(
    logits,
    targets,
    logp,
    m,
    log_s,
    omp,
    entropy,
    grad_logp,
    grad_entropy,
    temperature: float,
    col_offset: int = 0,
    rowsum: torch.Tensor | None = None,
):
    """dloss/dlogits [N, Vc] fp32 for vocabulary columns ``col_offset`` + [0, Vc), in place in ``logits``;
    each row's sum of them is added to ``rowsum`` [N] when given."""
    z = logits if logits.dtype == torch.float32 else logits.float()
    if temperature != 1.0:
        z.div_(temperature)
    z.sub_(m.unsqueeze(-1))  # exactly forward's shift, so p_j below adds up with 1 - p_t
    g = grad_logp.float().unsqueeze(-1)
    use_entropy = entropy is not None and grad_entropy is not None
    if use_entropy:
        g_ent = grad_entropy.float().unsqueeze(-1)
        h = entropy.unsqueeze(-1)
        z.sub_(log_s.unsqueeze(-1))  # log p
        p = torch.exp(z)
        z.add_(h).mul_(p).mul_(-g_ent)  # g_ent dH/dz_j = -g_ent p_j (log p_j + H)
        z.sub_(p.mul_(g))
        del p
    else:
        z.exp_().mul_(-g * torch.exp(-log_s).unsqueeze(-1))  # -g p_j
    # the target column: g (1 - p_t), not g - g p_t, which rounds to 0 when p_t ~ 1
    local = targets.long() - col_offset
    rows = ((local >= 0) & (local < z.shape[1])).nonzero().squeeze(-1)
    if rows.numel():
        tgt = grad_logp.float()[rows] * omp[rows]
        if use_entropy:
            lp_t = logp[rows]
            tgt = tgt - grad_entropy.float()[rows] * torch.exp(lp_t) * (lp_t + entropy[rows])
        z[rows, local[rows]] = tgt
    if temperature != 1.0:
        z.div_(temperature)
    if rowsum is not None:
        rowsum += z.sum(-1)
    return z


def _rows_grad_torch(logits, targets, grad_logp, grad_entropy, temperature: float):
    """PyTorch twin of ``logprob_rows_grad``: statistics from these logits, then dloss/dlogits [C, V]."""
    logp, m, log_s, omp, entropy = _rows_fwd_torch(
        logits.clone(), targets, temperature, grad_entropy is not None
    )
    return _rows_bwd_torch(
        logits, targets, logp, m, log_s, omp, entropy, grad_logp, grad_entropy, temperature
    )


# ---------------------------------------------------------------------------------------------------
# Chunk loop shared by both row backends, the autograd wrapper and the public entry point.


def chunk_logits(h_chunk: torch.Tensor, weight_gemm: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
    """[C, V] logits of one chunk written into ``buffer`` [chunk, V], reused across chunks (on a CPU a
    fresh buffer per chunk costs more in page faults than the softmax passes themselves).
    ``weight_gemm`` is fp32 on the PyTorch path, the input dtype (cuBLAS, fp32 accumulation) for Triton."""
    out = buffer[: h_chunk.shape[0]]
    h = h_chunk if h_chunk.dtype == weight_gemm.dtype else h_chunk.to(weight_gemm.dtype)
    return torch.mm(h, weight_gemm.T, out=out)


def gemm_weight(weight: torch.Tensor, backend: str) -> torch.Tensor:
    return weight.float() if backend == "torch" and weight.dtype != torch.float32 else weight


def logits_buffer(chunk: int, num_rows: int, weight_gemm: torch.Tensor) -> torch.Tensor:
    return torch.empty(
        min(chunk, num_rows), weight_gemm.shape[0], device=weight_gemm.device, dtype=weight_gemm.dtype
    )


def check_logprob_inputs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float
):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden [N, H] and weight [V, H] must be 2-D, got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden {tuple(hidden.shape)} vs weight {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must have shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise TypeError(f"hidden and weight dtypes differ: {hidden.dtype} vs {weight.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(
            f"targets must lie in [0, {weight.shape[0]}), got [{int(targets.min())}, {int(targets.max())}]"
        )


def _forward_chunks(hidden, weight, targets, temperature, return_entropy, backend, chunk):
    num_rows = hidden.shape[0]
    rows_fwd = logprob_rows_fwd if backend == "triton" else _rows_fwd_torch
    # rows: logp, max, log-sum-exp - max, 1 - p_target, entropy
    stats = torch.empty(5, num_rows, device=hidden.device, dtype=torch.float32)
    weight_gemm = gemm_weight(weight, backend)
    buffer = logits_buffer(chunk, num_rows, weight_gemm)
    for start in range(0, num_rows, chunk):
        end = min(start + chunk, num_rows)
        logits = chunk_logits(hidden[start:end], weight_gemm, buffer)  # [C, V]
        *row_stats, ent = rows_fwd(logits, targets[start:end], temperature, return_entropy)
        del logits
        for i, value in enumerate(row_stats):
            stats[i, start:end] = value
        if return_entropy:
            stats[4, start:end] = ent
    return stats


def recompute_logits(h: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Backward's recomputed logits ``h @ w.T`` into ``out`` (a seam for tests: they perturb it)."""
    return torch.mm(h, w.T, out=out)


def _backward_over_rows(backend: str, hidden: torch.Tensor) -> bool:
    """Which backward: row chunks with recomputed statistics for Triton and every CUDA tensor,
    vocabulary slices for the PyTorch backend on a CPU."""
    return backend == "triton" or hidden.is_cuda


def _backward_row_chunks(hidden, weight, targets, grad_logp, grad_entropy, temperature, backend, chunk, need):
    """dL/dhidden and dL/dweight over forward's row chunks: per chunk, the [C, V] logits again, the row
    kernel (which recomputes the row statistics from them, so the gradient is consistent with whatever
    bits this GEMM produced), then the two gradient GEMMs, dL/dweight accumulated in fp32. The path of
    the Triton backend and of every CUDA tensor."""
    num_rows = hidden.shape[0]
    rows_grad = logprob_rows_grad if backend == "triton" else _rows_grad_torch
    weight_gemm = gemm_weight(weight, backend)
    buffer = logits_buffer(chunk, num_rows, weight_gemm)
    grads = ChunkGrads(hidden, weight, need)
    for start in range(0, num_rows, chunk):
        end = min(start + chunk, num_rows)
        h = hidden[start:end]
        hg = h if h.dtype == weight_gemm.dtype else h.to(weight_gemm.dtype)
        logits = recompute_logits(hg, weight_gemm, buffer[: end - start])
        g_ent = None if grad_entropy is None else grad_entropy[start:end]
        dlogits = rows_grad(logits, targets[start:end], grad_logp[start:end], g_ent, temperature)
        grads.add(dlogits, h, weight_gemm, start)
        del logits, dlogits
    return grads.result()


def _backward_vocab_slices(
    hidden, weight, targets, stats, grad_logp, grad_entropy, temperature, backend, chunk, need
):
    """dL/dhidden and dL/dweight of the PyTorch backend on a CPU, sliced over the vocabulary instead of the
    rows: per slice of Vc columns (a multiple of 128) one [N, Vc] logits GEMM, the row pass, then
    dL/dweight[slice] = dlogits.T @ hidden in one GEMM (written once, no weight-sized accumulator) and
    dL/dhidden += dlogits @ weight[slice] into an [N, H] fp32 accumulator, which is much smaller than
    [V, H]. Same element budget as the forward.

    The row statistics (m, log_s, 1 - p_t) come from forward, whose GEMM had other shapes and need not
    have produced the same last bits. log p and the entropy are invariant to a shift of all logits, so
    each row of dL/dlogits sums to zero; a mismatch breaks that by up to |logit| x 2^-24 x g, which the
    weight columns then amplify (on an H200, logits near -2e4 gave errors of 300 in dL/dhidden). Each
    row's sum is therefore removed from its target column after the slices: a rank-1 correction of both
    gradients. (``_backward_row_chunks`` recomputes the statistics instead.)"""
    num_rows, hidden_size = hidden.shape
    vocab = weight.shape[0]
    logp, m, log_s, omp = stats[0], stats[1], stats[2], stats[3]
    entropy = stats[4] if grad_entropy is not None else None
    weight_gemm = gemm_weight(weight, backend)
    h_gemm = hidden if hidden.dtype == weight_gemm.dtype else hidden.to(weight_gemm.dtype)
    cols = min(vocab, max(128, chunk * vocab // max(num_rows, 1) // 128 * 128))
    rowsum = torch.zeros(num_rows, device=hidden.device, dtype=torch.float32)
    buffer = torch.empty(num_rows * cols, device=hidden.device, dtype=weight_gemm.dtype)
    grad_hidden = (
        torch.zeros(num_rows, hidden_size, device=hidden.device, dtype=torch.float32) if need[0] else None
    )
    grad_weight = torch.empty_like(weight) if need[1] else None
    for start in range(0, vocab, cols):
        end = min(start + cols, vocab)
        w = weight_gemm[start:end]
        logits = recompute_logits(h_gemm, w, buffer[: num_rows * (end - start)].view(num_rows, end - start))
        dlogits = _rows_bwd_torch(
            logits, targets, logp, m, log_s, omp, entropy, grad_logp, grad_entropy, temperature, start, rowsum
        )  # [N, Vc]
        if dlogits.dtype != w.dtype:
            dlogits = dlogits.to(w.dtype)
        if grad_hidden is not None:
            if w.dtype == torch.float32:
                grad_hidden.addmm_(dlogits, w)
            else:
                grad_hidden += dlogits @ w
        if grad_weight is not None:
            if grad_weight.dtype == dlogits.dtype and grad_weight.is_contiguous():
                torch.mm(dlogits.T, h_gemm, out=grad_weight[start:end])
            else:
                grad_weight[start:end] = dlogits.T @ h_gemm
        del logits, dlogits
    fix = -rowsum  # [N]: added to dL/dlogits[i, target_i]
    if grad_hidden is not None:
        grad_hidden += fix.unsqueeze(-1) * weight_gemm[targets].float()
        grad_hidden = grad_hidden.to(hidden.dtype)
    if grad_weight is not None:
        grad_weight.index_add_(0, targets, (fix.unsqueeze(-1) * hidden.float()).to(grad_weight.dtype))
    return grad_hidden, grad_weight


class ChunkGrads:
    """dL/dhidden and dL/dweight of a pass over row chunks, added chunk by chunk (``add``): the chunk's
    rows of dL/dhidden, and dL/dweight in fp32, written rather than added by the first chunk so the
    [V, H] gradient needs no zero-fill pass. ``result()`` gives both in the inputs' dtypes (None where
    ``need`` says no)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, need: tuple[bool, bool]):
        self.grad_hidden = torch.empty_like(hidden) if need[0] else None
        self.grad_weight = (
            torch.empty(weight.shape, device=weight.device, dtype=torch.float32) if need[1] else None
        )
        self.weight_dtype = weight.dtype
        self.first = True

    def add(self, dlogits: torch.Tensor, h: torch.Tensor, weight_gemm: torch.Tensor, start: int) -> None:
        """The two gradient GEMMs of the chunk whose rows start at ``start``."""
        if dlogits.dtype != weight_gemm.dtype:
            dlogits = dlogits.to(weight_gemm.dtype)
        if self.grad_hidden is not None:
            self.grad_hidden[start : start + dlogits.shape[0]] = dlogits @ weight_gemm
        grad_weight = self.grad_weight
        if grad_weight is not None:
            hg = h if h.dtype == dlogits.dtype else h.to(dlogits.dtype)
            same = grad_weight.dtype == dlogits.dtype
            if self.first:
                if same:
                    torch.mm(dlogits.T, hg, out=grad_weight)
                else:
                    grad_weight.copy_(dlogits.T @ hg)
            elif same:
                grad_weight.addmm_(dlogits.T, hg)
            else:
                grad_weight += dlogits.T @ hg
        self.first = False

    def result(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        grad_weight = self.grad_weight
        if grad_weight is not None:
            if self.first:  # no chunk wrote it (no rows)
                grad_weight.zero_()
            grad_weight = grad_weight.to(self.weight_dtype)
        return self.grad_hidden, grad_weight


class _FusedLinearLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, backend, chunk):
        stats = _forward_chunks(hidden, weight, targets, temperature, return_entropy, backend, chunk)
        # an output that reaches no loss (an entropy computed only to be logged) arrives as None in
        # backward instead of zeros, and its vocabulary passes are skipped
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, targets, stats)
        ctx.config = (temperature, return_entropy, backend, chunk)
        logp = stats[0].clone()
        entropy = stats[4].clone() if return_entropy else stats.new_empty(0)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, stats = ctx.saved_tensors
        temperature, return_entropy, backend, chunk = ctx.config
        need = ctx.needs_input_grad[:2]
        grad_entropy = grad_entropy if return_entropy else None
        if not any(need) or (grad_logp is None and grad_entropy is None):
            return None, None, None, None, None, None, None
        if grad_logp is None:
            grad_logp = torch.zeros_like(stats[0])
        common = (grad_logp, grad_entropy, temperature, backend, chunk, need)
        if _backward_over_rows(backend, hidden):
            grad_hidden, grad_weight = _backward_row_chunks(hidden, weight, targets, *common)
        else:
            grad_hidden, grad_weight = _backward_vocab_slices(hidden, weight, targets, stats, *common)
        return grad_hidden, grad_weight, None, None, None, None, None


def fused_linear_logprob(
    hidden: torch.Tensor,  # [N, H]
    weight: torch.Tensor,  # [V, H]
    targets: torch.Tensor,  # [N] int
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    backend: str | None = None,
    chunk_size: int | None = None,
):
    """log p(targets) [N] fp32 (and the entropy [N] fp32), differentiable in ``hidden`` and ``weight``.

    Equivalent to ``fused_linear_logprob_ref``; no [N, V] tensor is ever stored. ``backend`` forces
    ``"triton"`` or ``"torch"`` (default: ``SPICE_FAST_KERNELS``, else Triton on CUDA); ``chunk_size``
    overrides the rows per vocabulary GEMM.
    """
    check_logprob_inputs(hidden, weight, targets, temperature)
    chosen = pick_backend(backend, hidden, weight)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    chunk = chunk_size or default_chunk_rows(hidden.shape[0], weight.shape[0], chosen)
    targets = targets.contiguous()
    logp, entropy = _FusedLinearLogprob.apply(
        hidden, weight, targets, float(temperature), bool(return_entropy), chosen, chunk
    )
    return (logp, entropy) if return_entropy else logp
