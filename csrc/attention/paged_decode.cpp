// Paged decode attention on the CPU, reading the KV blocks in place (see paged_decode.h).
#include "attention/paged_decode.h"

#include "parallel.h"
#include "vec.h"

#include <algorithm>
#include <atomic>
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

// y += a * x
template <typename T>
SPICE_INLINE void axpy(float a, const T* x, float* y, int n) {
    int d = 0;
    for (; d + kLanes <= n; d += kLanes) store16(y + d, load16(y + d) + a * load16(x + d));
    for (; d < n; ++d) y[d] += a * to_float(x[d]);
}

// Per-thread scratch: every query head's scaled query, accumulator, running max and sum, and one
// block of scores.
struct Scratch {
    std::vector<float> q, acc, scores, run_max, run_sum;
    explicit Scratch(const DecodeArgs& a)
        : q(a.num_heads * a.head_dim),
          acc(q.size()),
          scores(a.num_heads * a.block_size),
          run_max(a.num_heads),
          run_sum(a.num_heads) {}
};

// One sequence: all its query heads (a KV head's group together), online softmax over its blocks,
// read in order so each block's rows stream contiguously.
template <typename T>
SPICE_INLINE void attend_seq(const DecodeArgs& a, Scratch& w, int64_t seq) {
    const int heads = static_cast<int>(a.num_heads);
    const int kv_heads = static_cast<int>(a.num_kv_heads);
    const int group = heads / kv_heads;
    const int dim = static_cast<int>(a.head_dim);
    const int64_t len = a.context_lens[seq];
    const int64_t row_stride = a.num_kv_heads * a.head_dim;  // between positions in a block
    const int64_t block_stride = a.block_size * row_stride;  // between blocks
    const T* k_cache = static_cast<const T*>(a.k_cache);
    const T* v_cache = static_cast<const T*>(a.v_cache);
    const T* q_src = static_cast<const T*>(a.q) + seq * heads * dim;
    for (int i = 0; i < heads * dim; ++i) w.q[i] = to_float(q_src[i]) * a.scale;
    std::fill(w.acc.begin(), w.acc.end(), 0.f);
    std::fill(w.run_max.begin(), w.run_max.end(), -std::numeric_limits<float>::infinity());
    std::fill(w.run_sum.begin(), w.run_sum.end(), 0.f);
    const int32_t* table = a.block_tables + seq * a.table_stride;
    const int64_t num_pages = (len + a.block_size - 1) / a.block_size;
    for (int64_t page = 0; page < num_pages; ++page) {
        const int64_t n = std::min<int64_t>(a.block_size, len - page * a.block_size);
        const T* k_block = k_cache + table[page] * block_stride;
        const T* v_block = v_cache + table[page] * block_stride;
        // Scores of the block's positions for every query head: 16 positions at a time where the head
        // width allows (one transposing reduction for the 16), the rest one by one.
        int64_t t0 = 0;
        if (dim % kLanes == 0)
            for (; t0 + kLanes <= n; t0 += kLanes)
                for (int h = 0; h < heads; ++h)
                    store16(w.scores.data() + h * a.block_size + t0,
                            dot16(w.q.data() + h * dim, k_block + t0 * row_stride + (h / group) * dim, row_stride, dim));
        for (int64_t t = t0; t < n; ++t)
            for (int h = 0; h < heads; ++h)
                w.scores[h * a.block_size + t] =
                    dot(w.q.data() + h * dim, k_block + t * row_stride + (h / group) * dim, dim);
        // Online softmax: rescale what is accumulated when the running max grows, then weights.
        for (int h = 0; h < heads; ++h) {
            float* s = w.scores.data() + h * a.block_size;
            float block_max = s[0];
            for (int64_t t = 1; t < n; ++t) block_max = std::max(block_max, s[t]);
            const float new_max = std::max(w.run_max[h], block_max);
            const float rescale = std::exp(w.run_max[h] - new_max);  // 0 on the first block
            float* acc = w.acc.data() + h * dim;
            if (rescale != 1.f)
                for (int d = 0; d < dim; ++d) acc[d] *= rescale;
            exp_shifted(s, n, new_max);
            float sum = 0.f;
            for (int64_t t = 0; t < n; ++t) sum += s[t];
            w.run_sum[h] = w.run_sum[h] * rescale + sum;
            w.run_max[h] = new_max;
        }
        for (int64_t t = 0; t < n; ++t)
            for (int h = 0; h < heads; ++h)
                axpy(w.scores[h * a.block_size + t], v_block + t * row_stride + (h / group) * dim,
                     w.acc.data() + h * dim, dim);
    }
    float* dst = a.out + seq * heads * dim;
    for (int h = 0; h < heads; ++h) {
        const float inv = w.run_sum[h] > 0.f ? 1.f / w.run_sum[h] : 0.f;
        for (int d = 0; d < dim; ++d) dst[h * dim + d] = w.acc[h * dim + d] * inv;
    }
}

SPICE_CLONES void run_tasks_f32(const DecodeArgs* a, Scratch* w, int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq) attend_seq<float>(*a, *w, seq);
}

SPICE_CLONES void run_tasks_bf16(const DecodeArgs* a, Scratch* w, int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq) attend_seq<uint16_t>(*a, *w, seq);
}

constexpr int64_t kMinWorkPerThread = int64_t(1) << 18;

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
    auto run = dtype == DType::kFloat32 ? run_tasks_f32 : run_tasks_bf16;
    const int64_t tasks = a.num_seqs;
    int64_t work = 0;  // multiply-adds of the scores and the weighted sum
    for (int64_t s = 0; s < a.num_seqs; ++s) work += 2 * a.context_lens[s] * a.num_heads * a.head_dim;
    // The threads are torch's OpenMP workers (csrc/parallel.h), so a parallel call costs microseconds;
    // below kMinWorkPerThread multiply-adds per thread one thread still finishes sooner.
    const int64_t by_work = std::max<int64_t>(1, work / kMinWorkPerThread);
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>({int64_t(num_threads), tasks, by_work}));
    // Tasks are handed out in small chunks, so sequences of different lengths balance across threads.
    std::atomic<int64_t> next{0};
    const int64_t chunk = std::max<int64_t>(1, tasks / (threads * 4));
    spice_parallel::run_on_threads(threads, [&](int64_t) {
        Scratch w(a);
        for (int64_t begin = next.fetch_add(chunk); begin < tasks; begin = next.fetch_add(chunk))
            run(&a, &w, begin, std::min(tasks, begin + chunk));
    });
}

}  // namespace spice_attention
