// SwiGLU forward and backward in one pass each (see swiglu.h).
#include "ops/swiglu.h"

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include "vec.h"

namespace spice_ops {
namespace {

using namespace spice_vec;

// sigmoid(x) from e = e^-|x| in (0, 1]: 1 / (1 + e) for x >= 0, e / (1 + e) below, so e^x never
// overflows.
SPICE_INLINE f32x16 sigmoid(f32x16 x) {
    const f32x16 e = exp_nonpositive(x < 0.f ? x : -x);
    const f32x16 inv = 1.f / (1.f + e);
    return x >= 0.f ? inv : e * inv;
}

SPICE_INLINE f32x16 silu_mul(f32x16 g, f32x16 u) { return g * sigmoid(g) * u; }

// dg and du of h = silu(g) * u given dh.
SPICE_INLINE void silu_mul_grads(f32x16 dh, f32x16 g, f32x16 u, f32x16& dg, f32x16& du) {
    const f32x16 s = sigmoid(g);
    const f32x16 gs = g * s;
    dg = dh * u * (s + gs * (1.f - s));
    du = dh * gs;
}

// A last partial vector is read through zero-padded copies and written back in part.
SPICE_INLINE f32x16 load_part(const float* p, int64_t n) {
    float tmp[kLanes] = {};
    std::memcpy(tmp, p, n * sizeof(float));
    return load16(tmp);
}
SPICE_INLINE void store_part(float* p, f32x16 v, int64_t n) { std::memcpy(p, &v, n * sizeof(float)); }

SPICE_CLONES void forward_range(const float* g, const float* u, float* h, int64_t begin, int64_t end) {
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) store16(h + i, silu_mul(load16(g + i), load16(u + i)));
    if (i < end) store_part(h + i, silu_mul(load_part(g + i, end - i), load_part(u + i, end - i)), end - i);
}

SPICE_CLONES void backward_range(const float* dh, const float* g, const float* u, float* dg, float* du,
                                 int64_t begin, int64_t end) {
    f32x16 vg, vu;
    int64_t i = begin;
    for (; i + kLanes <= end; i += kLanes) {
        silu_mul_grads(load16(dh + i), load16(g + i), load16(u + i), vg, vu);
        store16(dg + i, vg);
        store16(du + i, vu);
    }
    if (i < end) {
        const int64_t n = end - i;
        silu_mul_grads(load_part(dh + i, n), load_part(g + i, n), load_part(u + i, n), vg, vu);
        store_part(dg + i, vg, n);
        store_part(du + i, vu, n);
    }
}

// Below about 64K elements a thread costs more to start than it saves.
constexpr int64_t kMinPerThread = 1 << 16;
constexpr int64_t kAlign = 64;  // split points on cache-line multiples of floats

template <typename F>
void parallel_ranges(int64_t n, int num_threads, F&& fn) {
    const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(num_threads, n / kMinPerThread));
    if (threads == 1) {
        fn(0, n);
        return;
    }
    const int64_t per = ((n + threads - 1) / threads + kAlign - 1) / kAlign * kAlign;
    std::vector<std::thread> pool;
    pool.reserve(threads - 1);
    for (int64_t t = 1; t < threads; ++t) {
        const int64_t begin = std::min(n, t * per), end = std::min(n, begin + per);
        if (begin < end) pool.emplace_back([&fn, begin, end] { fn(begin, end); });
    }
    fn(0, std::min(n, per));
    for (auto& t : pool) t.join();
}

}  // namespace

void swiglu_forward(const float* g, const float* u, float* h, int64_t n, int num_threads) {
    parallel_ranges(n, num_threads, [=](int64_t b, int64_t e) { forward_range(g, u, h, b, e); });
}

void swiglu_backward(const float* dh, const float* g, const float* u, float* dg, float* du, int64_t n,
                     int num_threads) {
    parallel_ranges(n, num_threads, [=](int64_t b, int64_t e) { backward_range(dh, g, u, dg, du, b, e); });
}

}  // namespace spice_ops
