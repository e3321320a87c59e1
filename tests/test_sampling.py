"""Token sampling (spice_fast.engine.sampling): the torch reference and the C++ kernel each follow the
distribution, and the C++ kernel draws the reference's tokens with its logprobs."""

import pytest
import torch
from helpers import assert_close
from spice_fast.kernels._utils import cpu_ops_available

from spice_fast.engine.sampling import _CANDIDATES, _CHUNK, row_key, sample_tokens

needs_cpp = pytest.mark.skipif(not cpu_ops_available(), reason="spice_fast._cpu_ops is not built")


@pytest.fixture(params=["torch", pytest.param("cpp", marks=needs_cpp)])
def backend(request):
    return request.param


def test_sampler_frequencies_follow_the_distribution(backend):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, -30.0])
    rows = 20000
    keys = [row_key(9, 0, i) for i in range(rows)]
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.6)]:
        expected = torch.softmax(logits / temperature, dim=-1)
        if top_k:
            expected[expected.argsort(descending=True)[top_k:]] = 0
        if top_p < 1:
            order = expected.argsort(descending=True)
            before = expected[order].cumsum(0) - expected[order]
            expected[order[before >= top_p]] = 0
        expected /= expected.sum()
        tokens, logprobs = sample_tokens(logits.expand(rows, -1), [temperature] * rows, [top_p] * rows,
                                         [top_k] * rows, keys, backend)  # fmt: skip
        freq = torch.bincount(tokens, minlength=6).double() / rows
        assert_close(freq, expected.double(), atol=0.012, name=f"T={temperature} k={top_k} p={top_p}")
        full = torch.log_softmax(logits / temperature, dim=-1)
        assert_close(logprobs, full[tokens], atol=1e-6)


def test_sampler_two_level_search_over_a_large_vocabulary(backend):
    """Vocabulary of several search chunks plus a ragged tail: frequencies follow the distribution,
    filtered tokens are never drawn, and greedy rows mixed with sampled rows take the argmax."""
    vocab = 2 * _CHUNK + 37
    logits = torch.full((vocab,), -8.0)
    hot = torch.tensor([0, _CHUNK - 1, _CHUNK, 2 * _CHUNK + 36, 1500])  # chunk edges and the tail
    logits[hot] = torch.tensor([1.0, 2.0, 0.5, 1.5, 0.0])
    rows = 6000
    keys = [row_key(3, 1, i) for i in range(rows)]
    for top_k, temperature in [(0, 1.0), (4, 1.0), (0, 0.7)]:
        expected = torch.softmax(logits / temperature, dim=-1)
        if top_k:
            expected[expected.argsort(descending=True)[top_k:]] = 0
            expected /= expected.sum()
        tokens, _ = sample_tokens(logits.expand(rows, -1), [temperature] * rows, [1.0] * rows,
                                  [top_k] * rows, keys, backend)  # fmt: skip
        freq = torch.bincount(tokens, minlength=vocab).double() / rows
        assert_close(freq[hot], expected[hot].double(), atol=0.02, name=f"k={top_k} T={temperature}")
        if top_k:
            assert set(tokens.tolist()) <= set(expected.nonzero().flatten().tolist())
    temps = [0.0, 1.0] * 50
    tokens, logprobs = sample_tokens(
        logits.expand(100, -1), temps, [1.0] * 100, [0] * 100, keys[:100], backend
    )
    assert (tokens[::2] == _CHUNK - 1).all()
    assert_close(logprobs, torch.log_softmax(logits, -1)[tokens], atol=1e-5)


def test_sampler_top_p_beyond_the_candidates_and_mixed_batches(backend):
    """A nucleus wider than the top-k candidates falls back to a full sort (tokens past the
    candidates are drawn); a batch mixing plain, top-k, top-p and greedy rows samples each its way."""
    vocab = 3 * _CANDIDATES[-1]
    flat = torch.zeros(vocab)
    flat[: vocab // 10] = -50.0  # a tenth of the vocabulary outside any 0.9 nucleus
    rows = 3000
    keys = [row_key(5, 2, i) for i in range(rows)]
    tokens, _ = sample_tokens(flat.expand(rows, -1), [1.0] * rows, [0.9] * rows, [0] * rows, keys, backend)
    assert len(set(tokens.tolist())) > _CANDIDATES[-1]  # not confined to the candidates
    assert bool((tokens >= vocab // 10).all())  # never outside the nucleus
    # a nucleus wider than the first candidates and narrower than the next: drawn among the next
    wide = torch.full((vocab,), -50.0)
    wide[-5 * _CANDIDATES[0] :] = 0.0
    tokens, _ = sample_tokens(wide.expand(rows, -1), [1.0] * rows, [0.9] * rows, [0] * rows, keys, backend)
    assert len(set(tokens.tolist())) > 4 * _CANDIDATES[0]
    assert bool((tokens >= vocab - 5 * _CANDIDATES[0]).all())

    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(1)) * 3
    order = logits.argsort(descending=True)
    probs = torch.softmax(logits, -1)
    nucleus = order[: int(((probs[order].cumsum(0) - probs[order]) < 0.5).sum())]
    temps, ps, ks = [1.0, 1.0, 1.0, 0.0] * 500, [1.0, 0.5, 1.0, 0.5] * 500, [0, 0, 3, 0] * 500
    tokens, logprobs = sample_tokens(logits.expand(2000, -1), temps, ps, ks, keys[:2000], backend)
    assert set(tokens[1::4].tolist()) <= set(nucleus.tolist())
    assert set(tokens[2::4].tolist()) <= set(order[:3].tolist())
    assert (tokens[3::4] == order[0]).all()
    assert len(set(tokens[0::4].tolist())) > 20  # plain rows draw from everything
    assert_close(logprobs, torch.log_softmax(logits, -1)[tokens], atol=1e-5)


def _draw_both(logits, temps, ps, ks, keys):
    ref = sample_tokens(logits, temps, ps, ks, keys, backend="torch")
    fast = sample_tokens(logits, temps, ps, ks, keys, backend="cpp")
    return ref, fast


@needs_cpp
@pytest.mark.parametrize("vocab", [1, 37, 1000 + 37, 49152 + 1])
@pytest.mark.parametrize(
    ("temperature", "top_p", "top_k"),
    [
        (1.0, 1.0, 0),
        (0.7, 1.0, 0),
        (0.7, 0.95, 0),
        (1.3, 0.5, 0),
        (1.0, 1.0, 5),
        (0.8, 0.9, 50),
        (0.0, 1.0, 0),
    ],  # fmt: skip
)
def test_cpp_sampler_draws_the_reference_tokens(vocab, temperature, top_p, top_k):
    """Same keys, same tokens: both invert the CDF of the same distribution in the same token order;
    a row may differ only where u falls within rounding of a token boundary. Logprobs to float32
    rounding of a logsumexp."""
    gen = torch.Generator().manual_seed(vocab)
    rows = 64
    logits = torch.randn(rows, vocab, generator=gen) * 3 + torch.randn(vocab, generator=gen) * 4
    keys = [row_key(11, r, vocab) for r in range(rows)]
    (t_ref, lp_ref), (t_fast, lp_fast) = _draw_both(
        logits, [temperature] * rows, [top_p] * rows, [top_k] * rows, keys
    )
    assert t_fast.dtype == torch.int64 and lp_fast.dtype == torch.float32
    assert int((t_ref != t_fast).sum()) <= 1, (t_ref, t_fast)
    same = t_ref == t_fast
    assert_close(lp_fast[same], lp_ref[same], atol=2e-5, rtol=1e-6)
    exact = torch.log_softmax((logits / (temperature or 1.0)).double(), -1)
    assert_close(lp_fast, exact.gather(1, t_fast[:, None]).squeeze(1).float(), atol=2e-5, rtol=1e-6)


@needs_cpp
def test_cpp_sampler_mixed_rows_strided_logits_and_bad_rows():
    """A batch mixing every kind of row, logits read through a row stride, masked (-inf) tokens never
    drawn, and rows without a finite logit or with a NaN: token 0 with a NaN logprob on both paths
    (never an exception), the other rows untouched."""
    vocab = 3 * _CANDIDATES[-1] + 5
    gen = torch.Generator().manual_seed(4)
    wide = torch.randn(12, vocab + 9, generator=gen) * 2
    logits = wide[:, :vocab]  # row stride vocab + 9
    logits[:, ::3] = float("-inf")
    logits[4] = float("-inf")
    logits[7, 10] = float("nan")
    temps = [1.0, 0.7, 0.0, 1.0] * 3
    ps = [1.0, 0.9, 1.0, 0.6] * 3
    ks = [0, 0, 0, 7] * 3
    keys = [row_key(2, r, 0) for r in range(12)]
    (t_ref, lp_ref), (t_fast, lp_fast) = _draw_both(logits, temps, ps, ks, keys)
    good = [r for r in range(12) if r not in (4, 7)]
    assert t_fast[good].tolist() == t_ref[good].tolist()
    assert_close(lp_fast[good], lp_ref[good], atol=2e-5)
    assert bool((t_fast[good] % 3 != 0).all())
    for tokens, logprobs in ((t_ref, lp_ref), (t_fast, lp_fast)):
        assert tokens[[4, 7]].tolist() == [0, 0] and bool(logprobs[[4, 7]].isnan().all())


@needs_cpp
def test_cpp_sampler_wide_nucleus_and_ties():
    """Exact ties are ordered by index (torch's topk leaves their order open, so no comparison with the
    reference here): a flat nucleus of most of the vocabulary, all in one histogram bucket, keeps the
    tied tokens of lowest index up to top_p of the mass; top-k keeps the k of lowest index."""
    vocab = 5000
    rows = 400
    keys = [row_key(8, r, 1) for r in range(rows)]
    flat = torch.zeros(rows, vocab)
    flat[:, :500] = -40.0  # 4,500 tied tokens; 0.9 of their mass is the first 4,050
    t_fast, _ = sample_tokens(flat, [1.0] * rows, [0.9] * rows, [0] * rows, keys, backend="cpp")
    assert bool((t_fast >= 500).all()) and bool((t_fast <= 500 + 4050).all())
    assert len(set(t_fast.tolist())) > 300 and int(t_fast.max()) > 4000
    steps = torch.zeros(rows, vocab)
    steps[:, 100:110] = 5.0  # ten tied leaders: top-3 keeps the three of lowest index
    t_fast, _ = sample_tokens(steps, [1.0] * rows, [1.0] * rows, [3] * rows, keys, backend="cpp")
    assert set(t_fast.tolist()) == {100, 101, 102}
    # tokens exactly 2 and 4 units below the maximum, the edges of the candidate bands
    edges = torch.full((rows, vocab), -30.0)
    edges[:, 7] = 5.0
    edges[:, [40, 41, 42]] = 3.0
    edges[:, [50, 51]] = 1.0
    for k, want in ((3, {7, 40, 41}), (5, {7, 40, 41, 42, 50})):
        t_fast, _ = sample_tokens(edges, [1.0] * rows, [1.0] * rows, [k] * rows, keys, backend="cpp")
        assert set(t_fast.tolist()) == want
