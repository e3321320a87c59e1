// Paged decode attention on the CPU, reading the KV blocks in place (see paged_decode.h).
#include "attention/paged_decode.h"

#include "parallel.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace spice_attention {
namespace {

using namespace spice_vec;

// Dot product of a float vector with a row of the cache (float32 or bfloat16).
template <typename T>
SPICE_INLINE float dot(const float* q, const T* k, int n) {
    f32x16 acc = {};
    int d = 0;
    for (; d + kLanes <= n; d += kLanes) acc += load16(q + d) * load16(k + d);
    float s = hsum(acc);
    for (; d < n; ++d) s += q[d] * to_float(k[d]);
    return s;
}

// Lane t of the result is the sum of the 16 lanes of a[t]: a transposing tree of two-source shuffles
// (15 adds), instead of 16 separate horizontal sums.
SPICE_INLINE f32x16 reduce16(const f32x16* a) {
    const i32x16 lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const i32x16 hi1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const i32x16 lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const i32x16 hi2 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const i32x16 lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const i32x16 hi3 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const i32x16 lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const i32x16 hi4 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    f32x16 b[8], c[4], d[2];
    // b[i]: 8 partial sums of a[2i], then 8 of a[2i+1]; c[j]: 4 each of a[4j..4j+3]; d[k]: 2 each of
    // a[8k..8k+7]; then one each of a[0..15], in order
    for (int i = 0; i < 8; ++i)
        b[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], lo1) + __builtin_shuffle(a[2 * i], a[2 * i + 1], hi1);
    for (int j = 0; j < 4; ++j)
        c[j] = __builtin_shuffle(b[2 * j], b[2 * j + 1], lo2) + __builtin_shuffle(b[2 * j], b[2 * j + 1], hi2);
    for (int k = 0; k < 2; ++k)
        d[k] = __builtin_shuffle(c[2 * k], c[2 * k + 1], lo3) + __builtin_shuffle(c[2 * k], c[2 * k + 1], hi3);
    return __builtin_shuffle(d[0], d[1], lo4) + __builtin_shuffle(d[0], d[1], hi4);
}

// Dot products of q with 16 rows of the cache `stride` values apart (n a multiple of 16).
template <typename T>
SPICE_INLINE f32x16 dot16(const float* q, const T* k, int64_t stride, int n) {
    f32x16 acc[kLanes] = {};
    for (int d = 0; d < n; d += kLanes) {
        const f32x16 qv = load16(q + d);
        for (int t = 0; t < kLanes; ++t) acc[t] += qv * load16(k + t * stride + d);
    }
    return reduce16(acc);
}

// acc[h] = acc[h] * rescale[h] + sum_t p[h][t] v[t] for the G query heads of one KV head, over one
// block's n positions, kLanes values of the head at a time: the G accumulators stay in registers
// while the block's value rows stream past once (G a compile-time count so they can).
template <int G, typename T>
SPICE_INLINE void weighted_sum(const float* p, int64_t p_stride, const T* v, int64_t row_stride, int64_t n,
                               const float* rescale, float* acc, int dim) {
    int c = 0;
    for (; c + kLanes <= dim; c += kLanes) {
        f32x16 a[G];
        for (int j = 0; j < G; ++j) a[j] = load16(acc + j * dim + c) * rescale[j];
        for (int64_t t = 0; t < n; ++t) {
            const f32x16 x = load16(v + t * row_stride + c);
            for (int j = 0; j < G; ++j) a[j] += p[j * p_stride + t] * x;
        }
        for (int j = 0; j < G; ++j) store16(acc + j * dim + c, a[j]);
    }
    for (; c < dim; ++c)
        for (int j = 0; j < G; ++j) {
            float y = acc[j * dim + c] * rescale[j];
            for (int64_t t = 0; t < n; ++t) y += p[j * p_stride + t] * to_float(v[t * row_stride + c]);
            acc[j * dim + c] = y;
        }
}

// weighted_sum over `count` heads: groups of up to 8 at a time.
template <typename T>
SPICE_INLINE void weighted_sum_heads(int count, const float* p, int64_t p_stride, const T* v, int64_t row_stride,
                                     int64_t n, const float* rescale, float* acc, int dim) {
    for (int h = 0; h < count;) {
        const int g = std::min(count - h, 8);
        const float* ph = p + h * p_stride;
        float* ah = acc + h * dim;
        switch (g) {
            case 1: weighted_sum<1>(ph, p_stride, v, row_stride, n, rescale + h, ah, dim); break;
            case 2: weighted_sum<2>(ph, p_stride, v, row_stride, n, rescale + h, ah, dim); break;
            case 3: weighted_sum<3>(ph, p_stride, v, row_stride, n, rescale + h, ah, dim); break;
            case 4: weighted_sum<4>(ph, p_stride, v, row_stride, n, rescale + h, ah, dim); break;
            case 5: weighted_sum<5>(ph, p_stride, v, row_stride, n, rescale + h, ah, dim); break;
            case 6: weighted_sum<6>(ph, p_stride, v, row_stride, n, rescale + h, ah, dim); break;
            case 7: weighted_sum<7>(ph, p_stride, v, row_stride, n, rescale + h, ah, dim); break;
            default: weighted_sum<8>(ph, p_stride, v, row_stride, n, rescale + h, ah, dim); break;
        }
        h += g;
    }
}

// Per-thread scratch for up to max_group sequences: each one's scaled query, accumulator, running max
// and sum, the rescale of its last block, and one block of scores.
struct Scratch {
    std::vector<float> q, acc, scores, run_max, run_sum, rescale;
    Scratch(const DecodeArgs& a, int64_t max_group)
        : q(max_group * a.num_heads * a.head_dim),
          acc(q.size()),
          scores(max_group * a.num_heads * a.block_size),
          run_max(max_group * a.num_heads),
          run_sum(run_max.size()),
          rescale(run_max.size()) {}
};

// Sequences [begin, end) that read their first `shared` pages from the same blocks (a prompt's samples).
struct Group {
    int64_t begin, end, shared;
};

// The online-softmax state of the i-th sequence of a group, in the scratch.
struct SeqState {
    float *q, *acc, *scores, *run_max, *run_sum, *rescale;
};

SPICE_INLINE SeqState state_of(const DecodeArgs& a, Scratch& w, int64_t i) {
    const int64_t heads = a.num_heads, hd = a.num_heads * a.head_dim;
    return {w.q.data() + i * hd,           w.acc.data() + i * hd,     w.scores.data() + i * heads * a.block_size,
            w.run_max.data() + i * heads, w.run_sum.data() + i * heads, w.rescale.data() + i * heads};
}

// One block of n positions for one sequence's query heads (a KV head's group together): scores, the
// online-softmax update, and the weighted sum of the values.
template <typename T>
SPICE_INLINE void attend_block(const DecodeArgs& a, const SeqState& st, const T* k_block, const T* v_block,
                               int64_t n) {
    const int heads = static_cast<int>(a.num_heads);
    const int kv_heads = static_cast<int>(a.num_kv_heads);
    const int group = heads / kv_heads;
    const int dim = static_cast<int>(a.head_dim);
    const int64_t row_stride = a.num_kv_heads * a.head_dim;  // between positions in a block
    // Scores of the block's positions for every query head: 16 positions at a time where the head
    // width allows (one transposing reduction for the 16), the rest one by one.
    int64_t t0 = 0;
    if (dim % kLanes == 0)
        for (; t0 + kLanes <= n; t0 += kLanes)
            for (int h = 0; h < heads; ++h)
                store16(st.scores + h * a.block_size + t0,
                        dot16(st.q + h * dim, k_block + t0 * row_stride + (h / group) * dim, row_stride, dim));
    for (int64_t t = t0; t < n; ++t)
        for (int h = 0; h < heads; ++h)
            st.scores[h * a.block_size + t] = dot(st.q + h * dim, k_block + t * row_stride + (h / group) * dim, dim);
    // Online softmax: what is accumulated is rescaled when the running max grows (by weighted_sum), then
    // the block's weights are added.
    for (int h = 0; h < heads; ++h) {
        float* sc = st.scores + h * a.block_size;
        float block_max = sc[0];
        for (int64_t t = 1; t < n; ++t) block_max = std::max(block_max, sc[t]);
        const float new_max = std::max(st.run_max[h], block_max);
        st.rescale[h] = std::exp(st.run_max[h] - new_max);  // 0 on the first block
        exp_shifted(sc, n, new_max);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) sum += sc[t];
        st.run_sum[h] = st.run_sum[h] * st.rescale[h] + sum;
        st.run_max[h] = new_max;
    }
    for (int g = 0; g < kv_heads; ++g)
        weighted_sum_heads(group, st.scores + g * group * a.block_size, a.block_size, v_block + g * dim, row_stride,
                           n, st.rescale + g * group, st.acc + g * group * dim, dim);
}

// A group of sequences: the shared pages block by block for all of them, so each shared block comes
// from memory once and from cache for the other sequences; then each one's own pages.
template <typename T>
SPICE_INLINE void attend_group(const DecodeArgs& a, Scratch& w, const Group& grp) {
    const int64_t hd = a.num_heads * a.head_dim;
    const int64_t block_stride = a.block_size * a.num_kv_heads * a.head_dim;  // between blocks
    const T* k_cache = static_cast<const T*>(a.k_cache);
    const T* v_cache = static_cast<const T*>(a.v_cache);
    for (int64_t seq = grp.begin; seq < grp.end; ++seq) {
        const SeqState st = state_of(a, w, seq - grp.begin);
        const T* q_src = static_cast<const T*>(a.q) + seq * hd;
        for (int64_t i = 0; i < hd; ++i) st.q[i] = to_float(q_src[i]) * a.scale;
        std::fill(st.acc, st.acc + hd, 0.f);
        std::fill(st.run_max, st.run_max + a.num_heads, -std::numeric_limits<float>::infinity());
        std::fill(st.run_sum, st.run_sum + a.num_heads, 0.f);
    }
    const int32_t* first_table = a.block_tables + grp.begin * a.table_stride;
    for (int64_t page = 0; page < grp.shared; ++page)  // full pages: n = block_size
        for (int64_t seq = grp.begin; seq < grp.end; ++seq)
            attend_block(a, state_of(a, w, seq - grp.begin), k_cache + first_table[page] * block_stride,
                         v_cache + first_table[page] * block_stride, a.block_size);
    for (int64_t seq = grp.begin; seq < grp.end; ++seq) {
        const SeqState st = state_of(a, w, seq - grp.begin);
        const int64_t len = a.context_lens[seq];
        const int32_t* table = a.block_tables + seq * a.table_stride;
        for (int64_t page = grp.shared; page * a.block_size < len; ++page)
            attend_block(a, st, k_cache + table[page] * block_stride, v_cache + table[page] * block_stride,
                         std::min<int64_t>(a.block_size, len - page * a.block_size));
        float* dst = a.out + seq * hd;
        const int dim = static_cast<int>(a.head_dim);
        for (int h = 0; h < a.num_heads; ++h) {
            const float inv = st.run_sum[h] > 0.f ? 1.f / st.run_sum[h] : 0.f;
            for (int d = 0; d < dim; ++d) dst[h * dim + d] = st.acc[h * dim + d] * inv;
        }
    }
}

SPICE_CLONES void run_group_f32(const DecodeArgs* a, Scratch* w, const Group* g) { attend_group<float>(*a, *w, *g); }

SPICE_CLONES void run_group_bf16(const DecodeArgs* a, Scratch* w, const Group* g) {
    attend_group<uint16_t>(*a, *w, *g);
}

// Consecutive sequences whose tables start with the same block share their common full leading pages
// (blocks are shared by reference, so one id means one content); groups hold at most max_group.
std::vector<Group> find_groups(const DecodeArgs& a, int64_t max_group) {
    std::vector<Group> groups;
    auto full_pages = [&](int64_t s) { return a.context_lens[s] / a.block_size; };
    for (int64_t s = 0; s < a.num_seqs;) {
        const int32_t* first = a.block_tables + s * a.table_stride;
        int64_t shared = full_pages(s), e = s + 1;
        for (; e < a.num_seqs && e - s < max_group && shared > 0; ++e) {
            const int32_t* table = a.block_tables + e * a.table_stride;
            int64_t common = 0;
            const int64_t limit = std::min(shared, full_pages(e));
            while (common < limit && table[common] == first[common]) ++common;
            if (common == 0) break;
            shared = common;
        }
        groups.push_back({s, e, e - s > 1 ? shared : 0});
        s = e;
    }
    return groups;
}

constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;
constexpr int64_t kMaxGroup = 64;  // sequences sharing blocks processed together (bounds the scratch)

}  // namespace

void paged_decode(const DecodeArgs& a, DType dtype, int num_threads) {
    if (a.num_kv_heads <= 0 || a.num_heads % a.num_kv_heads != 0)
        throw std::invalid_argument("num_heads must be a positive multiple of num_kv_heads");
    if (a.head_dim <= 0) throw std::invalid_argument("head_dim must be positive");
    if (a.block_size <= 0) throw std::invalid_argument("block_size must be positive");
    for (int64_t s = 0; s < a.num_seqs; ++s) {
        const int64_t len = a.context_lens[s];
        const int64_t pages = (len + a.block_size - 1) / a.block_size;
        if (len < 0 || pages > a.max_blocks)
            throw std::invalid_argument("context_lens[" + std::to_string(s) + "] = " + std::to_string(len) +
                                        " needs more blocks than the table's " + std::to_string(a.max_blocks));
        for (int64_t i = 0; i < pages; ++i) {
            const int32_t b = a.block_tables[s * a.table_stride + i];
            if (b < 0 || b >= a.num_blocks)
                throw std::invalid_argument("block_tables[" + std::to_string(s) + ", " + std::to_string(i) +
                                            "] = " + std::to_string(b) + " is outside the pool of " +
                                            std::to_string(a.num_blocks) + " blocks");
        }
    }
    auto run = dtype == DType::kFloat32 ? run_group_f32 : run_group_bf16;
    int64_t work = 0;  // multiply-adds of the scores and the weighted sum
    for (int64_t s = 0; s < a.num_seqs; ++s) work += 2 * a.context_lens[s] * a.num_heads * a.head_dim;
    // The threads are torch's OpenMP workers (csrc/parallel.h), so a parallel call costs microseconds;
    // below kMinWorkPerThread multiply-adds per thread one thread still finishes sooner.
    const int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), a.num_seqs, by_work}));
    // Groups of at most an even share of the sequences per thread, so that one prompt's samples still
    // spread over all threads; handed out one at a time, so groups of different lengths balance.
    const int64_t max_group = std::max<int64_t>(1, std::min<int64_t>(kMaxGroup, (a.num_seqs + threads - 1) / threads));
    const std::vector<Group> groups = find_groups(a, max_group);
    spice_parallel::for_each_index(
        static_cast<int64_t>(groups.size()), threads, [&] { return Scratch(a, max_group); },
        [&](int64_t g, Scratch& w) { run(&a, &w, &groups[g]); });
}

}  // namespace spice_attention
