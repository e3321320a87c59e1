// Paged decode attention on the CPU, reading the KV blocks in place (see paged_decode.h).
#include "attention/paged_decode.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace spice_attention {
namespace {

// Everything below run_tasks_* is inlined into it, so each instruction-set clone vectorizes all of it.
#if defined(__GNUC__)
#define SPICE_INLINE inline __attribute__((always_inline))
#else
#define SPICE_INLINE inline
#endif

constexpr int kLanes = 16;      // floats per vector value

SPICE_INLINE float to_float(float x) { return x; }
SPICE_INLINE float to_float(uint16_t x) {  // bfloat16: the high half of a float32
    uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// 16 floats as one value: GCC / Clang vector extensions, compiled per instruction-set clone into one
// AVX-512 register, two AVX2 ones or four SSE ones.
typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

SPICE_INLINE f32x16 load16(const float* p) {
    f32x16 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
SPICE_INLINE f32x16 load16(const uint16_t* p) {
    u16x16 h;
    std::memcpy(&h, p, sizeof h);
    const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;
    f32x16 v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
}
SPICE_INLINE void store16(float* p, f32x16 v) { std::memcpy(p, &v, sizeof v); }

// Sum of the 16 lanes as a tree of halves (a few adds deep, not a chain of 15).
SPICE_INLINE float hsum(f32x16 v) {
    f32x8 lo8, hi8;
    std::memcpy(&lo8, &v, sizeof lo8);
    std::memcpy(&hi8, reinterpret_cast<const char*>(&v) + sizeof lo8, sizeof hi8);
    const f32x8 s8 = lo8 + hi8;
    f32x4 lo4, hi4;
    std::memcpy(&lo4, &s8, sizeof lo4);
    std::memcpy(&hi4, reinterpret_cast<const char*>(&s8) + sizeof lo4, sizeof hi4);
    const f32x4 s4 = lo4 + hi4;
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

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

// y += a * x
template <typename T>
SPICE_INLINE void axpy(float a, const T* x, float* y, int n) {
    int d = 0;
    for (; d + kLanes <= n; d += kLanes) store16(y + d, load16(y + d) + a * load16(x + d));
    for (; d < n; ++d) y[d] += a * to_float(x[d]);
}

// e^x for x <= 0 (softmax weights) in branch-free arithmetic that vectorizes: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by Cephes' degree-7 expf polynomial, 2^n through the exponent bits. Relative
// error below 2e-7 (std::exp's is 6e-8); 0 below -87, where float32 underflows anyway.
SPICE_INLINE float exp_nonpositive(float x) {
    const float c = std::max(x, -87.f);
    const float n = std::floor(c * 1.44269504088896341f + 0.5f);
    const float r = (c - n * 0.693359375f) + n * 2.12194440e-4f;  // Cody-Waite: ln2 in two parts
    const float r2 = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.f;
    const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < -87.f ? 0.f : p * scale;
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
        // Scores of the block's positions for every query head; each K row is read once.
        for (int64_t t = 0; t < n; ++t)
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
            for (int64_t t = 0; t < n; ++t) s[t] = exp_nonpositive(s[t] - new_max);  // vectorized
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

// The per-task loop is compiled for several instruction sets and picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPICE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPICE_CLONES
#endif

SPICE_CLONES void run_tasks_f32(const DecodeArgs* a, Scratch* w, int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq) attend_seq<float>(*a, *w, seq);
}

SPICE_CLONES void run_tasks_bf16(const DecodeArgs* a, Scratch* w, int64_t begin, int64_t end) {
    for (int64_t seq = begin; seq < end; ++seq) attend_seq<uint16_t>(*a, *w, seq);
}

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
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks));
    if (threads == 1) {
        Scratch w(a);
        run(&a, &w, 0, tasks);
        return;
    }
    // Tasks are handed out in small chunks, so sequences of different lengths balance across threads.
    std::atomic<int64_t> next{0};
    const int64_t chunk = std::max<int64_t>(1, tasks / (threads * 4));
    auto worker = [&]() {
        Scratch w(a);
        for (;;) {
            const int64_t begin = next.fetch_add(chunk);
            if (begin >= tasks) return;
            run(&a, &w, begin, std::min(tasks, begin + chunk));
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int64_t i = 1; i < threads; ++i) pool.emplace_back(worker);
    worker();
    for (auto& t : pool) t.join();
}

}  // namespace spice_attention
