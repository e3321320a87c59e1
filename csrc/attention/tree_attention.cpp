// Prefix-tree attention on the CPU, forward and backward (see tree_attention.h).
//
// Work items are (node, KV head, block of 16 query rows). An item keeps its rows transposed: one
// vector holds one head dimension (or one key's score) for all 16 rows, so
// * scores are broadcast products: a key's value at dimension d times the vector of the rows' values
//   at d, accumulated over d straight into a vector of 16 scores (no horizontal sums);
// * the online softmax runs lane-wise, 16 rows at once;
// * the weighted sum of values accumulates the transposed output: value d of key j, broadcast, times
//   the vector of the rows' probabilities for key j.
// The query heads of the KV head (the GQA group) run together over each tile of keys, so a tile is
// read once per item. The backward recomputes the probabilities from the forward's log-sum-exp; the
// key and value gradients are sums over every query row that sees a key, from many items, so each
// thread's share of the items (a fixed split by cost) adds into its own buffers, which are summed at
// the end in a fixed order.
#include "attention/tree_attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace spice_attention {
namespace {

using namespace spice_vec;

constexpr int64_t kRows = kLanes;  // query rows of an item (one vector)
constexpr int64_t kKeyTile = 64;   // keys per tile
constexpr int kScoreKeys = 8;      // keys per score micro-tile (x up to 3 heads: 24 accumulators)
constexpr int kSumDims = 8;        // head dimensions per weighted-sum micro-tile
constexpr int kRowKeys = 6;        // key rows per gradient micro-tile (x 4 vectors of dims)
constexpr int kRowVecs = 4;
// Scores of one head's tile: kKeyTile keys rounded up to both micro-tile widths (see scores, accumulate_rows).
constexpr int64_t kScoreStride = (kKeyTile + 24) * kLanes;
constexpr int64_t kMaxGroup = 64;    // query heads per KV head (bounds the per-item state)

// 16 rows (`rows` of them real, the rest zero) of `dim` values at src (row stride ld), times mul,
// transposed into dst[d][row].
SPICE_INLINE void pack_transposed(const float* src, int64_t ld, int64_t rows, int64_t dim, float mul, float* dst) {
    for (int64_t d0 = 0; d0 < dim; d0 += kLanes) {
        f32x16 block[kLanes];
        for (int64_t i = 0; i < kLanes; ++i) block[i] = i < rows ? load16(src + i * ld + d0) * mul : f32x16{};
        transpose16(block);
        for (int64_t d = 0; d < kLanes; ++d) store16(dst + (d0 + d) * kLanes, block[d]);
    }
}

// The same rows, times mul, kept as rows: dst[row][d] (the rows past `rows` zero).
SPICE_INLINE void pack_rows(const float* src, int64_t ld, int64_t rows, int64_t dim, float mul, float* dst) {
    for (int64_t i = 0; i < kRows; ++i)
        for (int64_t d0 = 0; d0 < dim; d0 += kLanes)
            store16(dst + i * dim + d0, i < rows ? load16(src + i * ld + d0) * mul : f32x16{});
}

// src[d][row] times mul (lane per row), transposed back into the first `rows` rows at dst (stride ld).
SPICE_INLINE void unpack_transposed(const float* src, f32x16 mul, int64_t rows, int64_t dim, float* dst, int64_t ld) {
    for (int64_t d0 = 0; d0 < dim; d0 += kLanes) {
        f32x16 block[kLanes];
        for (int64_t d = 0; d < kLanes; ++d) block[d] = load16(src + (d0 + d) * kLanes) * mul;
        transpose16(block);
        for (int64_t i = 0; i < rows; ++i) store16(dst + i * ld + d0, block[i]);
    }
}

// s[n][c] = sum_d a[n][d] * b[c][d] for NV row vectors (a transposed, a_stride apart) and KC key rows
// of b (ldb apart): each s[n][c] a vector of 16 rows' scores.
template <int NV, int KC>
SPICE_INLINE void scores_chunk(const float* a, int64_t a_stride, const float* b, int64_t ldb, int64_t dim, float* s,
                               int64_t s_stride) {
    f32x16 acc[NV][KC] = {};
    for (int64_t d = 0; d < dim; ++d) {
        f32x16 x[NV];
        for (int n = 0; n < NV; ++n) x[n] = load16(a + n * a_stride + d * kLanes);
        for (int c = 0; c < KC; ++c) {
            const float y = b[c * ldb + d];
            for (int n = 0; n < NV; ++n) acc[n][c] += x[n] * y;
        }
    }
    for (int n = 0; n < NV; ++n)
        for (int c = 0; c < KC; ++c) store16(s + n * s_stride + c * kLanes, acc[n][c]);
}

// scores_chunk over `keys` key rows, 8 at a time; a last partial chunk reads its rows from a copy
// padded with zeros (`pad`, 8 rows) and writes 8 scores, so s must have room for keys rounded up to 8.
// One chunk width keeps the instantiations (and the build) small.
template <int NV>
SPICE_INLINE void scores(const float* a, int64_t a_stride, const float* b, int64_t ldb, int64_t keys, int64_t dim,
                         float* s, int64_t s_stride, float* pad) {
    int64_t c = 0;
    for (; c + kScoreKeys <= keys; c += kScoreKeys)
        scores_chunk<NV, kScoreKeys>(a, a_stride, b + c * ldb, ldb, dim, s + c * kLanes, s_stride);
    if (c < keys) {
        std::fill(pad, pad + kScoreKeys * dim, 0.f);
        for (int64_t j = c; j < keys; ++j) std::memcpy(pad + (j - c) * dim, b + j * ldb, dim * sizeof(float));
        scores_chunk<NV, kScoreKeys>(a, a_stride, pad, dim, dim, s + c * kLanes, s_stride);
    }
}

// o[n][d] = o[n][d] * alpha[n] + sum_j p[n][j] * b[j][d] for NV row vectors: o and p transposed (a
// vector of 16 rows per d or per key j), b's key rows ldb apart.
template <int NV>
SPICE_INLINE void accumulate_transposed(float* o, int64_t o_stride, const f32x16* alpha, const float* p,
                                        int64_t p_stride, const float* b, int64_t ldb, int64_t keys, int64_t dim) {
    for (int64_t d0 = 0; d0 < dim; d0 += kSumDims) {
        f32x16 acc[NV][kSumDims];
        for (int n = 0; n < NV; ++n)
            for (int c = 0; c < kSumDims; ++c) acc[n][c] = load16(o + n * o_stride + (d0 + c) * kLanes) * alpha[n];
        for (int64_t j = 0; j < keys; ++j) {
            f32x16 x[NV];
            for (int n = 0; n < NV; ++n) x[n] = load16(p + n * p_stride + j * kLanes);
            for (int c = 0; c < kSumDims; ++c) {
                const float y = b[j * ldb + d0 + c];
                for (int n = 0; n < NV; ++n) acc[n][c] += x[n] * y;
            }
        }
        for (int n = 0; n < NV; ++n)
            for (int c = 0; c < kSumDims; ++c) store16(o + n * o_stride + (d0 + c) * kLanes, acc[n][c]);
    }
}

// r[c][:] += sum over heads n and rows i of p[n][c][i] * x[n][i][:], for KC key rows of r (ldr apart)
// and DV vectors of dims: p transposed (key c's vector of rows), x as rows.
template <int KC, int DV>
SPICE_INLINE void accumulate_rows_chunk(float* r, int64_t ldr, const float* p, int64_t p_stride, const float* x,
                                        int64_t x_stride, int64_t heads, int64_t rows, int64_t dim) {
    f32x16 acc[KC][DV] = {};
    for (int64_t n = 0; n < heads; ++n)
        for (int64_t i = 0; i < rows; ++i) {
            f32x16 xv[DV];
            for (int v = 0; v < DV; ++v) xv[v] = load16(x + n * x_stride + i * dim + v * kLanes);
            for (int c = 0; c < KC; ++c) {
                const float y = p[n * p_stride + c * kLanes + i];
                for (int v = 0; v < DV; ++v) acc[c][v] += xv[v] * y;
            }
        }
    for (int c = 0; c < KC; ++c)
        for (int v = 0; v < DV; ++v) store16(r + c * ldr + v * kLanes, load16(r + c * ldr + v * kLanes) + acc[c][v]);
}

// accumulate_rows_chunk over `keys` key rows, kRowKeys at a time (a last partial chunk adds into a
// zeroed copy, `pad`, whose real rows are then added), and all dims, kRowVecs vectors at a time. p must
// hold keys rounded up to kRowKeys (the padding keys' values are never used).
SPICE_CLONES void accumulate_rows(float* r, int64_t ldr, const float* p, int64_t p_stride, const float* x,
                                  int64_t x_stride, int64_t heads, int64_t rows, int64_t dim, int64_t keys,
                                  float* pad) {
    for (int64_t d0 = 0; d0 < dim; d0 += kRowVecs * kLanes) {
        const int64_t vecs = std::min<int64_t>(kRowVecs, (dim - d0) / kLanes);
        for (int64_t c = 0; c < keys; c += kRowKeys) {
            const bool partial = c + kRowKeys > keys;
            float* out = partial ? pad : r + c * ldr + d0;
            const int64_t ld = partial ? kRowVecs * kLanes : ldr;
            if (partial) std::fill(pad, pad + kRowKeys * kRowVecs * kLanes, 0.f);
            const float* pc = p + c * kLanes;
            const float* xd = x + d0;
            const int64_t xs = x_stride;
            switch (vecs) {
                case 1: accumulate_rows_chunk<kRowKeys, 1>(out, ld, pc, p_stride, xd, xs, heads, rows, dim); break;
                case 2: accumulate_rows_chunk<kRowKeys, 2>(out, ld, pc, p_stride, xd, xs, heads, rows, dim); break;
                case 3: accumulate_rows_chunk<kRowKeys, 3>(out, ld, pc, p_stride, xd, xs, heads, rows, dim); break;
                default: accumulate_rows_chunk<kRowKeys, 4>(out, ld, pc, p_stride, xd, xs, heads, rows, dim); break;
            }
            if (partial)
                for (int64_t j = c; j < keys; ++j)
                    for (int64_t v = 0; v < vecs; ++v) {
                        float* dst = r + j * ldr + d0 + v * kLanes;
                        store16(dst, load16(dst) + load16(pad + (j - c) * kRowVecs * kLanes + v * kLanes));
                    }
        }
    }
}

// scores<NV> and accumulate_transposed<NV> over a group's heads, in runs of up to 3 heads (24
// accumulators per micro-tile); `a` and `o` hold one transposed block per head, `stride` apart.
SPICE_CLONES void scores_heads(int64_t group, const float* a, int64_t stride, const float* b, int64_t ldb,
                               int64_t keys, int64_t dim, float* s, int64_t s_stride, float* pad) {
    for (int64_t g = 0; g < group;) {
        const float* ag = a + g * stride;
        float* sg = s + g * s_stride;
        switch (std::min<int64_t>(group - g, 3)) {
            case 1: scores<1>(ag, stride, b, ldb, keys, dim, sg, s_stride, pad); g += 1; break;
            case 2: scores<2>(ag, stride, b, ldb, keys, dim, sg, s_stride, pad); g += 2; break;
            default: scores<3>(ag, stride, b, ldb, keys, dim, sg, s_stride, pad); g += 3; break;
        }
    }
}

SPICE_CLONES void accumulate_transposed_heads(int64_t group, float* o, int64_t stride, const f32x16* alpha,
                                              const float* p, int64_t p_stride, const float* b, int64_t ldb,
                                              int64_t keys, int64_t dim) {
    for (int64_t g = 0; g < group;) {
        float* og = o + g * stride;
        const float* pg = p + g * p_stride;
        switch (std::min<int64_t>(group - g, 3)) {
            case 1: accumulate_transposed<1>(og, stride, alpha + g, pg, p_stride, b, ldb, keys, dim); g += 1; break;
            case 2: accumulate_transposed<2>(og, stride, alpha + g, pg, p_stride, b, ldb, keys, dim); g += 2; break;
            default: accumulate_transposed<3>(og, stride, alpha + g, pg, p_stride, b, ldb, keys, dim); g += 3; break;
        }
    }
}

struct Item {
    int64_t node, kv_head, first_row;  // first_row: of the node's rows
};

// A tile of an item's keys: `keys` keys from token `first`. A causal tile holds some of the node's
// own keys that some of the item's rows must not see: row i sees key c when i >= c + offset.
struct Tile {
    int64_t first, keys;
    bool causal;
    int64_t offset;
};

// The tiles of keys the item's rows attend to: the ancestors' ranges, then the node's own keys up to
// its last row.
void tiles_of(const TreeArgs& a, const Item& it, std::vector<Tile>& tiles) {
    tiles.clear();
    const int64_t* node = a.nodes + it.node * 4;
    for (int64_t r = node[2]; r < node[3]; ++r) {
        const int64_t first = a.ranges[2 * r], count = a.ranges[2 * r + 1];
        for (int64_t j = 0; j < count; j += kKeyTile)
            tiles.push_back({first + j, std::min(kKeyTile, count - j), false, 0});
    }
    const int64_t own = std::min(node[1], it.first_row + kRows);
    for (int64_t j = 0; j < own; j += kKeyTile) {
        const int64_t keys = std::min(kKeyTile, own - j);
        tiles.push_back({node[0] + j, keys, j + keys - 1 > it.first_row, j - it.first_row});
    }
}

// Per-thread scratch of one item: its rows transposed and as rows, the accumulators, a tile of scores.
struct Scratch {
    std::vector<float> qt, acc, s, ds, qn, dot, don, run_max, run_sum, lse, di, pad;
    std::vector<Tile> tiles;
    explicit Scratch(const TreeArgs& a, bool backward) {
        const int64_t group = a.num_heads / a.num_kv_heads, rows_t = group * a.head_dim * kLanes;
        qt.resize(rows_t);
        acc.resize(rows_t);
        s.resize(group * kScoreStride);
        pad.resize(std::max<int64_t>(kScoreKeys * a.head_dim, kRowKeys * kRowVecs * kLanes));
        run_max.resize(group * kLanes);
        run_sum.resize(group * kLanes);
        if (backward) {
            ds.resize(s.size());
            qn.resize(rows_t);
            dot.resize(rows_t);
            don.resize(rows_t);
            lse.resize(group * kLanes);
            di.resize(group * kLanes);
        }
    }
};

// Scores of a tile hidden from rows that must not see them: causal tiles' later keys, and with
// `rows` < 16 the padding rows (backward only: there they must add nothing).
SPICE_INLINE void mask_tile(float* s, int64_t s_stride, int64_t group, const Tile& t, int64_t pad_from) {
    i32x16 lane;
    for (int i = 0; i < kLanes; ++i) lane[i] = i;
    const f32x16 hidden = f32x16{} - std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < t.keys; ++c) {
        const int64_t first_seen = t.causal ? std::max<int64_t>(0, c + t.offset) : 0;
        if (first_seen == 0 && pad_from >= kLanes) continue;
        const i32x16 hide = (lane < static_cast<int32_t>(first_seen)) | (lane >= static_cast<int32_t>(pad_from));
        for (int64_t g = 0; g < group; ++g) {
            float* p = s + g * s_stride + c * kLanes;
            store16(p, hide ? hidden : load16(p));
        }
    }
}

// Where an item's query rows are: the GQA group size, its real rows (up to 16), its first token and
// its first query head.
struct ItemRows {
    int64_t group, rows, q0, h0;
};

SPICE_INLINE ItemRows rows_of(const TreeArgs& a, const Item& it) {
    const int64_t group = a.num_heads / a.num_kv_heads;
    const int64_t* node = a.nodes + it.node * 4;
    return {group, std::min(kRows, node[1] - it.first_row), node[0] + it.first_row, it.kv_head * group};
}

SPICE_INLINE f32x16 vmax(f32x16 a, f32x16 b) { return a > b ? a : b; }

SPICE_CLONES void forward_item(const TreeArgs* ap, const Item* itp, Scratch* wp, float* out, float* lse) {
    const TreeArgs& a = *ap;
    const Item& it = *itp;
    Scratch& w = *wp;
    const ItemRows r = rows_of(a, it);
    const int64_t dim = a.head_dim, heads = a.num_heads, group = r.group, rows = r.rows, q0 = r.q0, h0 = r.h0;
    const int64_t t_stride = dim * kLanes, s_stride = kScoreStride;
    const int64_t ldk = a.num_kv_heads * dim;
    for (int64_t g = 0; g < group; ++g)
        pack_transposed(a.q + (q0 * heads + h0 + g) * dim, heads * dim, rows, dim, a.scale, w.qt.data() + g * t_stride);
    std::fill(w.acc.begin(), w.acc.end(), 0.f);
    std::fill(w.run_max.begin(), w.run_max.end(), -std::numeric_limits<float>::infinity());
    std::fill(w.run_sum.begin(), w.run_sum.end(), 0.f);
    f32x16 alpha[kMaxGroup];
    tiles_of(a, it, w.tiles);
    for (const Tile& t : w.tiles) {
        const int64_t at = t.first * ldk + it.kv_head * dim;
        scores_heads(group, w.qt.data(), t_stride, a.k + at, ldk, t.keys, dim, w.s.data(), s_stride, w.pad.data());
        if (t.causal) mask_tile(w.s.data(), s_stride, group, t, kLanes);
        for (int64_t g = 0; g < group; ++g) {  // online softmax, lane-wise
            float* s = w.s.data() + g * s_stride;
            f32x16 top = load16(s);
            for (int64_t c = 1; c < t.keys; ++c) top = vmax(top, load16(s + c * kLanes));
            const f32x16 old_max = load16(w.run_max.data() + g * kLanes), new_max = vmax(old_max, top);
            alpha[g] = exp_nonpositive(old_max - new_max);  // 0 on the first tile (old max -inf)
            f32x16 sum = {};
            for (int64_t c = 0; c < t.keys; ++c) {
                const f32x16 p = exp_nonpositive(load16(s + c * kLanes) - new_max);
                store16(s + c * kLanes, p);
                sum += p;
            }
            store16(w.run_max.data() + g * kLanes, new_max);
            store16(w.run_sum.data() + g * kLanes, load16(w.run_sum.data() + g * kLanes) * alpha[g] + sum);
        }
        accumulate_transposed_heads(group, w.acc.data(), t_stride, alpha, w.s.data(), s_stride, a.v + at, ldk, t.keys,
                                    dim);
    }
    for (int64_t g = 0; g < group; ++g) {
        const f32x16 total = load16(w.run_sum.data() + g * kLanes);
        unpack_transposed(w.acc.data() + g * t_stride, 1.f / total, rows, dim, out + (q0 * heads + h0 + g) * dim,
                          heads * dim);
        for (int64_t i = 0; i < rows; ++i)
            lse[(q0 + i) * heads + h0 + g] = w.run_max[g * kLanes + i] + std::log(w.run_sum[g * kLanes + i]);
    }
}

SPICE_CLONES void backward_item(const TreeArgs* ap, const Item* itp, Scratch* wp, const float* out, const float* lse,
                                const float* grad_out, float* dq, float* dk, float* dv) {
    const TreeArgs& a = *ap;
    const Item& it = *itp;
    Scratch& w = *wp;
    const ItemRows r = rows_of(a, it);
    const int64_t dim = a.head_dim, heads = a.num_heads, group = r.group, rows = r.rows, q0 = r.q0, h0 = r.h0;
    const int64_t t_stride = dim * kLanes, s_stride = kScoreStride;
    const int64_t ldk = a.num_kv_heads * dim, ldq = heads * dim;
    for (int64_t g = 0; g < group; ++g) {
        const int64_t at = (q0 * heads + h0 + g) * dim;
        pack_transposed(a.q + at, ldq, rows, dim, a.scale, w.qt.data() + g * t_stride);
        pack_rows(a.q + at, ldq, rows, dim, a.scale, w.qn.data() + g * t_stride);
        pack_transposed(grad_out + at, ldq, rows, dim, 1.f, w.dot.data() + g * t_stride);
        pack_rows(grad_out + at, ldq, rows, dim, 1.f, w.don.data() + g * t_stride);
        for (int64_t i = 0; i < kLanes; ++i) {
            float d = 0.f;  // rowsum(dO * O), the softmax's share of dS
            if (i < rows) {
                f32x16 acc = {};
                for (int64_t c = 0; c < dim; c += kLanes)
                    acc += load16(grad_out + at + i * ldq + c) * load16(out + at + i * ldq + c);
                d = hsum(acc);
            }
            w.di[g * kLanes + i] = d;
            w.lse[g * kLanes + i] = i < rows ? lse[(q0 + i) * heads + h0 + g] : 0.f;
        }
    }
    std::fill(w.acc.begin(), w.acc.end(), 0.f);  // dq, transposed
    f32x16 one[kMaxGroup];
    for (auto& x : one) x = f32x16{} + 1.f;
    tiles_of(a, it, w.tiles);
    for (const Tile& t : w.tiles) {
        const int64_t at = t.first * ldk + it.kv_head * dim;
        scores_heads(group, w.qt.data(), t_stride, a.k + at, ldk, t.keys, dim, w.s.data(), s_stride, w.pad.data());
        scores_heads(group, w.dot.data(), t_stride, a.v + at, ldk, t.keys, dim, w.ds.data(), s_stride,
                     w.pad.data());  // dP
        if (t.causal || rows < kLanes) mask_tile(w.s.data(), s_stride, group, t, rows);
        for (int64_t g = 0; g < group; ++g) {  // P = e^(S - lse), dS = P * (dP - rowsum(dO * O))
            float* s = w.s.data() + g * s_stride;
            float* ds = w.ds.data() + g * s_stride;
            const f32x16 l = load16(w.lse.data() + g * kLanes), d = load16(w.di.data() + g * kLanes);
            for (int64_t c = 0; c < t.keys; ++c) {
                const f32x16 p = exp_nonpositive(load16(s + c * kLanes) - l);
                store16(s + c * kLanes, p);
                store16(ds + c * kLanes, p * (load16(ds + c * kLanes) - d));
            }
        }
        accumulate_rows(dv + at, ldk, w.s.data(), s_stride, w.don.data(), t_stride, group, rows, dim, t.keys,
                        w.pad.data());
        accumulate_rows(dk + at, ldk, w.ds.data(), s_stride, w.qn.data(), t_stride, group, rows, dim, t.keys,
                        w.pad.data());
        accumulate_transposed_heads(group, w.acc.data(), t_stride, one, w.ds.data(), s_stride, a.k + at, ldk, t.keys,
                                    dim);
    }
    for (int64_t g = 0; g < group; ++g)
        unpack_transposed(w.acc.data() + g * t_stride, f32x16{} + a.scale, rows, dim, dq + (q0 * heads + h0 + g) * dim,
                          ldq);
}

// Items in node order, and each one's cost (keys it attends to).
void make_items(const TreeArgs& a, std::vector<Item>& items, std::vector<int64_t>& cost) {
    for (int64_t n = 0; n < a.num_nodes; ++n) {
        const int64_t* node = a.nodes + n * 4;
        int64_t ancestors = 0;
        for (int64_t r = node[2]; r < node[3]; ++r) ancestors += a.ranges[2 * r + 1];
        for (int64_t h = 0; h < a.num_kv_heads; ++h)
            for (int64_t i = 0; i < node[1]; i += kRows) {
                items.push_back({n, h, i});
                cost.push_back(ancestors + std::min(node[1], i + kRows));
            }
    }
}

std::string node_text(int64_t n) { return "node " + std::to_string(n); }

}  // namespace

void check_tree_args(const TreeArgs& a) {
    if (a.num_tokens < 0 || a.num_nodes < 0 || a.num_ranges < 0)
        throw std::invalid_argument("token, node and range counts must be >= 0");
    if (a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0)
        throw std::invalid_argument("num_heads (" + std::to_string(a.num_heads) +
                                    ") must be a positive multiple of num_kv_heads (" +
                                    std::to_string(a.num_kv_heads) + ")");
    if (a.num_heads / a.num_kv_heads > kMaxGroup)
        throw std::invalid_argument("at most 64 query heads per KV head, got " +
                                    std::to_string(a.num_heads / a.num_kv_heads));
    if (a.head_dim <= 0 || a.head_dim % kLanes != 0)
        throw std::invalid_argument("head_dim must be a positive multiple of 16, got " + std::to_string(a.head_dim));
    std::vector<char> seen(a.num_tokens, 0);
    int64_t covered = 0;
    for (int64_t n = 0; n < a.num_nodes; ++n) {
        const int64_t* node = a.nodes + n * 4;
        if (node[1] <= 0 || node[0] < 0 || node[0] > a.num_tokens - node[1])
            throw std::invalid_argument(node_text(n) + ": tokens [" + std::to_string(node[0]) + ", +" +
                                        std::to_string(node[1]) + ") are not a non-empty part of the " +
                                        std::to_string(a.num_tokens) + " tokens");
        if (node[2] < 0 || node[2] > node[3] || node[3] > a.num_ranges)
            throw std::invalid_argument(node_text(n) + ": ranges [" + std::to_string(node[2]) + ", " +
                                        std::to_string(node[3]) + ") are not within the " +
                                        std::to_string(a.num_ranges) + " ranges");
        for (int64_t t = node[0]; t < node[0] + node[1]; ++t) {
            if (seen[t])
                throw std::invalid_argument(node_text(n) + ": token " + std::to_string(t) + " is in two nodes");
            seen[t] = 1;
        }
        covered += node[1];
    }
    if (covered != a.num_tokens)
        throw std::invalid_argument("the nodes cover " + std::to_string(covered) + " of the " +
                                    std::to_string(a.num_tokens) + " tokens");
    for (int64_t r = 0; r < a.num_ranges; ++r) {
        const int64_t first = a.ranges[2 * r], count = a.ranges[2 * r + 1];
        if (count < 0 || first < 0 || first > a.num_tokens - count)
            throw std::invalid_argument("range " + std::to_string(r) + ": tokens [" + std::to_string(first) + ", +" +
                                        std::to_string(count) + ") are outside the " +
                                        std::to_string(a.num_tokens) + " tokens");
    }
}

void tree_attention_forward(const TreeArgs& a, float* out, float* lse, int num_threads) {
    std::vector<Item> items;
    std::vector<int64_t> cost;
    make_items(a, items, cost);
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, items.size()));
    spice_parallel::for_each_index(
        static_cast<int64_t>(items.size()), threads, [&] { return Scratch(a, false); },
        [&](int64_t i, Scratch& w) { forward_item(&a, &items[i], &w, out, lse); });
}

void tree_attention_backward(const TreeArgs& a, const float* out, const float* lse, const float* grad_out, float* dq,
                             float* dk, float* dv, int num_threads) {
    std::vector<Item> items;
    std::vector<int64_t> cost;
    make_items(a, items, cost);
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, items.size()));
    // A fixed split of the items into `threads` runs of about equal cost; run t adds its key and value
    // gradients into buffer t (the outputs themselves for t = 0).
    std::vector<int64_t> bounds{0};
    int64_t total = 0, sum = 0;
    for (int64_t c : cost) total += c;
    for (int64_t i = 0; i < static_cast<int64_t>(items.size()); ++i) {
        sum += cost[i];
        const int64_t cuts = static_cast<int64_t>(bounds.size());  // run `cuts` starts once its share is done
        if (cuts < threads && sum * threads >= total * cuts) bounds.push_back(i + 1);
    }
    while (static_cast<int64_t>(bounds.size()) <= threads) bounds.push_back(static_cast<int64_t>(items.size()));
    const int64_t kv_size = a.num_tokens * a.num_kv_heads * a.head_dim;
    std::vector<float> extra(2 * (threads - 1) * kv_size, 0.f);
    std::fill(dk, dk + kv_size, 0.f);
    std::fill(dv, dv + kv_size, 0.f);
    spice_parallel::for_each_index(
        threads, threads, [&] { return Scratch(a, true); },
        [&](int64_t t, Scratch& w) {
            float* k_grad = t == 0 ? dk : extra.data() + (2 * t - 2) * kv_size;
            float* v_grad = t == 0 ? dv : extra.data() + (2 * t - 1) * kv_size;
            for (int64_t i = bounds[t]; i < bounds[t + 1]; ++i)
                backward_item(&a, &items[i], &w, out, lse, grad_out, dq, k_grad, v_grad);
        });
    if (threads > 1)
        spice_parallel::parallel_ranges(kv_size, 1, static_cast<int>(threads), [&](int64_t begin, int64_t end) {
            for (int64_t t = 1; t < threads; ++t) {
                const float* k_extra = extra.data() + (2 * t - 2) * kv_size;
                const float* v_extra = extra.data() + (2 * t - 1) * kv_size;
                for (int64_t i = begin; i < end; ++i) {
                    dk[i] += k_extra[i];
                    dv[i] += v_extra[i];
                }
            }
        });
}

}  // namespace spice_attention
