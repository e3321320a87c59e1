// Token sampling on the CPU: one pass per row of float32 logits instead of the dozen torch operations of
// spice_fast.engine.sampling._sample_tokens_torch (the reference, whose draws this reproduces).
//
// Per row r, with scaled logits s = logits / T (T = 1 for greedy rows, T = 0):
//   logprob = s[token] - logsumexp(s), over the full vocabulary;
//   greedy (T = 0): token = the first argmax;
//   plain (no top-k, top_p >= 1): the first token whose cumulative mass, in vocabulary order, exceeds
//     u * total;
//   filtered: tokens sorted by s (descending, ties by index), the first top_k kept (renormalised over
//     them), then tokens kept while the mass before them is below top_p (at least one); the draw is
//     the inverse CDF of u over the kept tokens in that order.
// Only the tokens that can be in the filtered set are sorted: one vector pass sums the mass and count
// of the tokens within 2, 4, 8 and 16 units below the maximum, which bounds the set; a set reaching
// further (a flat distribution) is bounded by a histogram of those distances instead.
#pragma once

#include <cstdint>

namespace spice_ops {

// logits: rows x vocab float32, row stride ld. temps, top_ps, us: one value per row (us in [0, 1));
// top_ks: 0 or >= vocab for no top-k. Writes tokens[r] and logprobs[r]. A row with no finite logit
// (all -inf or NaN) gets token 0 and logprob NaN. Rows are split over up to num_threads threads.
void sample_rows(const float* logits, int64_t ld, int64_t rows, int64_t vocab, const float* temps,
                 const float* top_ps, const int64_t* top_ks, const float* us, int64_t* tokens, float* logprobs,
                 int num_threads);

}  // namespace spice_ops
