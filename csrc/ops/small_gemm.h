// y = x W^T (+ bias) for few rows of x: the dense layers of a decode step on the CPU.
//
// x [M, K], W [N, K] (a weight in its own row-major layout, read in place), y [M, N], float32, rows at
// the given strides (elements). W streams through once per call (per 32 rows) while x stays in cache;
// columns of y are split over threads (torch's OpenMP workers, see parallel.h). Two kernels:
// - up to 9 rows (and 17-23): each output a dot product of a row of x with a row of W; tiles of 4 rows
//   of x by 6 rows of W keep 24 vector accumulators in registers, the next tile's W rows prefetched.
//   Few rows wait on memory, which hides the horizontal sums at the end of each tile.
// - 10-16 and 24-32 rows: x is packed transposed (k-major, rows padded to 16 or 32), and each W value
//   is broadcast against one or two vectors that hold that k for every row, so the accumulators hold
//   whole outputs (8 or 12 W rows by 16 or 32 rows of x): no horizontal sums, near the FMA peak.
//   Outputs are transposed back 16 x 16 in registers. 1.2-1.6x the dot-product tiles at 16 and 32 rows.
// For M up to a few dozen this reads W at memory speed, where a general GEMM packs and blocks for
// large M.
#pragma once

#include <cstdint>

namespace spice_ops {

// Which kernel runs: kAuto picks by the row count as above; the others force one (tests, benches).
enum class GemmKernel : int { kAuto = 0, kDot = 1, kBroadcast = 2 };

void small_gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* y,
                int64_t ldy, int64_t m, int64_t n, int64_t k, int num_threads,
                GemmKernel kernel = GemmKernel::kAuto);

// The kernel kAuto runs for m rows (for more than 32, for the last block of them).
GemmKernel small_gemm_auto_kernel(int64_t m);

// Whether this CPU runs the AVX-512 build of small_gemm (elsewhere a general GEMM is faster).
bool small_gemm_vectorized();

}  // namespace spice_ops
