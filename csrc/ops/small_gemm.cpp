// y = x W^T (+ bias) for few rows of x (see small_gemm.h).
#include "ops/small_gemm.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace spice_ops {
namespace {

using namespace spice_vec;

constexpr int kRowsPerTile = 4;  // rows of x
constexpr int kColsPerTile = 6;  // rows of W (columns of y)
// Tile columns between the one computed and the one prefetched: enough loads in flight to draw 30+ GB/s
// from memory on two cores, where one column ahead (into L1) drew about 21 (measured, Zen 4).
constexpr int64_t kPrefetchColumns = 4;

// One tile: y[0..MR) x [0..NR) from x rows at `x` and W rows at `w`, K values each. With `next` (the
// W rows of a tile column further on), one cache line of each of its rows is prefetched per step, so
// later columns stream in from memory while this one computes.
template <int MR, int NR>
SPICE_INLINE void tile(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* y,
                       int64_t ldy, int64_t k, const float* next) {
    f32x16 acc[MR][NR] = {};
    int64_t i = 0;
    for (; i + kLanes <= k; i += kLanes) {
        if (next)  // into L2 (prefetcht1): they are used a few tiles later
            for (int c = 0; c < kColsPerTile; ++c) __builtin_prefetch(next + c * ldw + i, 0, 2);
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
// `next`: a later tile column's W rows, prefetched during the first tile row (nullptr: none).
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
        // prefetch the full tile column kPrefetchColumns ahead (the last ones are read on demand)
        const float* next =
            c + (kPrefetchColumns + 1) * kColsPerTile <= n1 ? w + (c + kPrefetchColumns * kColsPerTile) * ldw : nullptr;
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

// ---- 10-16 and 24-32 rows: x transposed, one W value broadcast against a vector of rows ----
// Each W value is multiplied into MV vectors holding all rows of x, so the accumulators hold whole
// outputs (no horizontal sums) and W streams through once, row by row (see small_gemm.h).

// Rows that take it (small_gemm_auto_kernel): 10-16 (one vector of rows) and 24-32 (two). With fewer
// the dot-product tiles above are as fast: both wait on memory, and packing x costs a few microseconds
// per call; at 17-23 rows much of the second vector is padding (measured on a Zen 4 with
// benches/bench_linear.py, which prints both kernels' times). More rows: blocks of 32.
constexpr int64_t kMinOneVectorRows = 10;
constexpr int64_t kMinTwoVectorRows = 24;
constexpr int64_t kMaxTransposedRows = 32;
constexpr int64_t kColumnUnit = 24;         // columns per unit of the thread split (tile widths 8, 12)
constexpr int64_t kChunk = 96;              // columns computed into a cache-resident block, then unpacked

// out[c][0..16 MV) = sum_i w[c][i] xt[i][0..16 MV) for NR rows c of W.
template <int MV, int NR>
SPICE_INLINE void broadcast_tile(const float* xt, const float* w, int64_t ldw, int64_t k, float* out) {
    constexpr int MP = MV * kLanes;
    f32x16 acc[NR][MV] = {};
    for (int64_t i = 0; i < k; ++i) {
        if ((i & (kLanes - 1)) == 0)  // a cache line of each W row of the next tile, into L2
            for (int c = 0; c < NR; ++c) __builtin_prefetch(w + (c + NR) * ldw + i, 0, 2);
        f32x16 xv[MV];
        for (int v = 0; v < MV; ++v) xv[v] = load16(xt + i * MP + v * kLanes);
        for (int c = 0; c < NR; ++c) {
            const f32x16 wv = w[c * ldw + i] - f32x16{};  // a broadcast (x - 0 is exact, so it folds away)
            for (int v = 0; v < MV; ++v) acc[c][v] += wv * xv[v];
        }
    }
    for (int c = 0; c < NR; ++c)
        for (int v = 0; v < MV; ++v) store16(out + c * MP + v * kLanes, acc[c][v]);
}

// One 16 x 16 block transposed: dst row j (dst_rows of them, dst_lanes values each) takes lane j of
// src rows 0..15, where src rows past src_rows and values past src_lanes read as 0; `add` (if given)
// is added to each dst row.
SPICE_INLINE void transpose_block(const float* src, int64_t ld_src, int64_t src_rows, int64_t src_lanes, float* dst,
                                  int64_t ld_dst, int64_t dst_rows, int64_t dst_lanes, const f32x16* add) {
    f32x16 v[kLanes];
    for (int64_t r = 0; r < kLanes; ++r) {
        const float* p = src + r * ld_src;
        v[r] = r >= src_rows ? f32x16{} : src_lanes == kLanes ? load16(p) : load_part(p, src_lanes);
    }
    transpose16(v);
    for (int64_t r = 0; r < dst_rows; ++r) {
        const f32x16 out = add ? v[r] + *add : v[r];
        if (dst_lanes == kLanes) store16(dst + r * ld_dst, out);
        else store_part(dst + r * ld_dst, out, dst_lanes);
    }
}

// xt[i][r] = x[r][i] for r < m, 0 for m <= r < mp (16 or 32), 16 x 16 at a time.
SPICE_INLINE void pack_transposed(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t mp, float* xt) {
    for (int64_t r0 = 0; r0 < mp; r0 += kLanes) {
        const int64_t rows = std::max<int64_t>(0, std::min<int64_t>(kLanes, m - r0));
        const int64_t lanes = std::min<int64_t>(kLanes, mp - r0);
        for (int64_t i0 = 0; i0 < k; i0 += kLanes) {
            const int64_t cols = std::min<int64_t>(kLanes, k - i0);
            transpose_block(x + r0 * ldx + i0, ldx, rows, cols, xt + i0 * mp + r0, mp, cols, lanes, nullptr);
        }
    }
}

// y[r][c0 + c] = yt[c][r] (+ bias[c0 + c]) for r < m, c < cols: the inverse of pack_transposed.
SPICE_INLINE void unpack_transposed(const float* yt, int64_t mp, int64_t m, int64_t cols, const float* bias,
                                    float* y, int64_t ldy) {
    for (int64_t r0 = 0; r0 < m; r0 += kLanes) {
        const int64_t rows = std::min<int64_t>(kLanes, m - r0);
        const int64_t lanes = std::min<int64_t>(kLanes, mp - r0);
        for (int64_t c0 = 0; c0 < cols; c0 += kLanes) {
            const int64_t cc = std::min<int64_t>(kLanes, cols - c0);
            const f32x16 b = !bias ? f32x16{} : cc == kLanes ? load16(bias + c0) : load_part(bias + c0, cc);
            transpose_block(yt + c0 * mp + r0, mp, cc, lanes, y + r0 * ldy + c0, ldy, rows, cc, &b);
        }
    }
}

// Columns [n0, n1) of y for the mp-row packed xt, kChunk columns at a time.
template <int MV, int NR>
SPICE_INLINE void broadcast_columns(const float* xt, int64_t m, const float* w, int64_t ldw, const float* bias,
                                    float* y, int64_t ldy, int64_t k, int64_t n0, int64_t n1) {
    constexpr int64_t MP = MV * kLanes;
    alignas(64) float yt[kChunk * MP];
    for (int64_t c0 = n0; c0 < n1; c0 += kChunk) {
        const int64_t cols = std::min(kChunk, n1 - c0);
        int64_t c = 0;
        for (; c + NR <= cols; c += NR) broadcast_tile<MV, NR>(xt, w + (c0 + c) * ldw, ldw, k, yt + c * MP);
        for (; c < cols; ++c) broadcast_tile<MV, 1>(xt, w + (c0 + c) * ldw, ldw, k, yt + c * MP);
        unpack_transposed(yt, MP, m, cols, bias ? bias + c0 : nullptr, y + c0, ldy);
    }
}

SPICE_CLONES void transposed_columns(const float* xt, int64_t mp, int64_t m, const float* w, int64_t ldw,
                                     const float* bias, float* y, int64_t ldy, int64_t k, int64_t n0, int64_t n1) {
    if (mp == kLanes) broadcast_columns<1, 8>(xt, m, w, ldw, bias, y, ldy, k, n0, n1);
    else broadcast_columns<2, 12>(xt, m, w, ldw, bias, y, ldy, k, n0, n1);
}

SPICE_CLONES void pack(const float* x, int64_t ldx, int64_t m, int64_t k, int64_t mp, float* xt) {
    pack_transposed(x, ldx, m, k, mp, xt);
}

// m rows, at most 32: x packed transposed, W's columns split over threads in whole units.
void transposed_gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* y,
                     int64_t ldy, int64_t m, int64_t n, int64_t k, int num_threads) {
    const int64_t mp = m <= kLanes ? kLanes : 2 * kLanes;
    thread_local std::vector<float> packed;
    if (static_cast<int64_t>(packed.size()) < k * mp) packed.resize(k * mp);
    pack(x, ldx, m, k, mp, packed.data());
    const int64_t units = (n + kColumnUnit - 1) / kColumnUnit;
    const int64_t by_work = m * n * k / kMinMacsPerThread;
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), by_work, units}));
    const int64_t per = (units + threads - 1) / threads * kColumnUnit;  // whole units per thread
    const float* xt = packed.data();
    spice_parallel::for_each_range(threads, [&](int64_t t) {
        const int64_t n0 = std::min(n, t * per), n1 = std::min(n, n0 + per);
        if (n0 < n1) transposed_columns(xt, mp, m, w, ldw, bias, y, ldy, k, n0, n1);
    });
}

}  // namespace

void small_gemm(const float* x, int64_t ldx, const float* w, int64_t ldw, const float* bias, float* y,
                int64_t ldy, int64_t m, int64_t n, int64_t k, int num_threads, GemmKernel kernel) {
    if (m <= 0 || n <= 0) return;
    if (m > kMaxTransposedRows && kernel != GemmKernel::kDot) {  // blocks of 32 rows, a pass over W each
        small_gemm(x, ldx, w, ldw, bias, y, ldy, kMaxTransposedRows, n, k, num_threads, kernel);
        small_gemm(x + kMaxTransposedRows * ldx, ldx, w, ldw, bias, y + kMaxTransposedRows * ldy, ldy,
                   m - kMaxTransposedRows, n, k, num_threads, kernel);
        return;
    }
    if (kernel == GemmKernel::kAuto) kernel = small_gemm_auto_kernel(m);
    if (kernel == GemmKernel::kBroadcast) {
        transposed_gemm(x, ldx, w, ldw, bias, y, ldy, m, n, k, num_threads);
        return;
    }
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

GemmKernel small_gemm_auto_kernel(int64_t m) {
    if (m > kMaxTransposedRows) m = (m - 1) % kMaxTransposedRows + 1;  // the last block's rows
    return (m >= kMinOneVectorRows && m <= kLanes) || m >= kMinTwoVectorRows ? GemmKernel::kBroadcast
                                                                              : GemmKernel::kDot;
}

bool small_gemm_vectorized() {
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx512f");
#else
    return false;
#endif
}

}  // namespace spice_ops
