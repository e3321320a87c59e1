// y = x W^T (+ bias) for few rows of x (see small_gemm.h).
#include "ops/small_gemm.h"

#include <algorithm>

#include "parallel.h"
#include "vec.h"

namespace spice_ops {
namespace {

using namespace spice_vec;

constexpr int kRowsPerTile = 4;  // rows of x
constexpr int kColsPerTile = 6;  // rows of W (columns of y)

// One tile: y[0..MR) x [0..NR) from x rows at `x` and W rows at `w`, K values each. With `next` (the
// W rows of the following tile column), one cache line of each of its rows is prefetched per step, so
// the next column streams in from memory while this one computes.
template <int MR, int NR>
SPICE_INLINE void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* y,
                       int64_t ldy, int64_t k, const float* next) {
    f32x16 acc[MR][NR] = {};
    int64_t i = 0;
    for (; i + kLanes <= k; i += kLanes) {
        if (next)
            for (int c = 0; c < kColsPerTile; ++c) __builtin_prefetch(next + c * ldw + i, 0, 3);
        f32x16 wv[NR];
        for (int c = 0; c < NR; ++c) wv[c] = load16(w + c * ldw + i);
        for (int r = 0; r < MR; ++r) {
            const f32x16 xv = load16(x + r * ldx + i);
            for (int c = 0; c < NR; ++c) acc[r][c] += xv * wv[c];
        }
    }
    if (i < k) {
        f32x16 wv[NR];
        for (int c = 0; c < NR; ++c) wv[c] = load_part(w + c * ldw + i, k - i);
        for (int r = 0; r < MR; ++r) {
            const f32x16 xv = load_part(x + r * ldx + i, k - i);
            for (int c = 0; c < NR; ++c) acc[r][c] += xv * wv[c];
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int c = 0; c < NR; ++c) y[r * ldy + c] = hsum(acc[r][c]) + (bias ? bias[c] : 0.f);
}

// All rows of x against W rows [n0, n1), tile by tile: a tile column of W is read from memory once and
// from cache for the next tile rows.
// `next`: the following tile column's W rows, prefetched during the first tile row (nullptr: none).
template <int NR>
SPICE_INLINE void tile_column(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias,
                              float* y, int64_t ldy, int64_t m, int64_t k, const float* next) {
    int64_t r = 0;
    for (; r + kRowsPerTile <= m; r += kRowsPerTile, next = nullptr)
        tile<kRowsPerTile, NR>(x + r * ldx, ldx, w, ldw, bias, y + r * ldy, ldy, k, next);
    switch (m - r) {
        case 3: tile<3, NR>(x + r * ldx, ldx, w, ldw, bias, y + r * ldy, ldy, k, next); break;
        case 2: tile<2, NR>(x + r * ldx, ldx, w, ldw, bias, y + r * ldy, ldy, k, next); break;
        case 1: tile<1, NR>(x + r * ldx, ldx, w, ldw, bias, y + r * ldy, ldy, k, next); break;
        default: break;
    }
}

SPICE_CLONES void columns(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* y,
                          int64_t ldy, int64_t m, int64_t k, int64_t n0, int64_t n1) {
    int64_t c = n0;
    for (; c + kColsPerTile <= n1; c += kColsPerTile) {
        // prefetch the next full tile column (a partial last one is read on demand)
        const float* next = c + 2 * kColsPerTile <= n1 ? w + (c + kColsPerTile) * ldw : nullptr;
        tile_column<kColsPerTile>(x, ldx, w + c * ldw, ldw, bias ? bias + c : nullptr, y + c, ldy, m, k, next);
    }
    const float* wc = w + c * ldw;
    const float* bc = bias ? bias + c : nullptr;
    switch (n1 - c) {
        case 5: tile_column<5>(x, ldx, wc, ldw, bc, y + c, ldy, m, k, nullptr); break;
        case 4: tile_column<4>(x, ldx, wc, ldw, bc, y + c, ldy, m, k, nullptr); break;
        case 3: tile_column<3>(x, ldx, wc, ldw, bc, y + c, ldy, m, k, nullptr); break;
        case 2: tile_column<2>(x, ldx, wc, ldw, bc, y + c, ldy, m, k, nullptr); break;
        case 1: tile_column<1>(x, ldx, wc, ldw, bc, y + c, ldy, m, k, nullptr); break;
        default: break;
    }
}

constexpr int64_t kMinMacsPerThread = int64_t(1) << 18;

}  // namespace

void small_gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* y,
                int64_t ldy, int64_t m, int64_t n, int64_t k, int num_threads) {
    if (m <= 0 || n <= 0) return;
    const int64_t by_work = m * n * k / kMinMacsPerThread;
    const int64_t tiles = (n + kColsPerTile - 1) / kColsPerTile;
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), by_work, tiles}));
    // `threads` contiguous runs of whole column tiles
    const int64_t per = (tiles + threads - 1) / threads * kColsPerTile;
    spice_parallel::for_each_range(threads, [&](int64_t t) {
        const int64_t n0 = std::min(n, t * per), n1 = std::min(n, n0 + per);
        if (n0 < n1) columns(x, ldx, w, ldw, bias, y, ldy, m, k, n0, n1);
    });
}

bool small_gemm_vectorized() {
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
}

}  // namespace spice_ops
