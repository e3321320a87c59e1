// y = x W^T (+ bias) for few rows of x: the dense layers of a decode step on the CPU.
//
// x [M, K], W [N, K] (a weight in its own row-major layout, read in place), y [M, N], float32, rows at
// the given strides (elements). Each output is a dot product of a row of x with a row of W: tiles of
// 4 rows of x by 6 rows of W keep 24 vector accumulators in registers while W streams through once
// per tile row (the next tile's rows prefetched meanwhile), and x (at most a few hundred KB) stays in
// cache. Columns of y are split over threads
// (torch's OpenMP workers, see parallel.h). For M up to a few dozen this reads W at memory speed,
// where a general GEMM packs and blocks for large M.
#pragma once

#include <cstdint>

namespace spice_ops {

void small_gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* y,
                int64_t ldy, int64_t m, int64_t n, int64_t k, int num_threads);

// Whether this CPU runs the AVX-512 build of small_gemm (elsewhere a general GEMM is faster).
bool small_gemm_vectorized();

}  // namespace spice_ops
