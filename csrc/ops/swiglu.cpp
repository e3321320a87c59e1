// SwiGLU forward and backward in one pass each (see swiglu.h).
#include "ops/swiglu.h"

#include <cmath>

#include "parallel.h"
#include "vec.h"

namespace spice_ops {
namespace {

using namespace spice_vec;
using spice_parallel::parallel_ranges;

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

}  // namespace

void swiglu_forward(const float* g, const float* u, float* h, int64_t n, int num_threads) {
    parallel_ranges(n, 1, num_threads, [=](int64_t b, int64_t e) { forward_range(g, u, h, b, e); });
}

void swiglu_backward(const float* dh, const float* g, const float* u, float* dg, float* du, int64_t n,
                     int num_threads) {
    parallel_ranges(n, 1, num_threads, [=](int64_t b, int64_t e) { backward_range(dh, g, u, dg, du, b, e); });
}

}  // namespace spice_ops
