// Vector helpers shared by the CPU kernels (attention/, ops/): 16 floats as one value through GCC /
// Clang vector extensions, compiled per instruction-set clone (SPICE_CLONES) into one AVX-512
// register, two AVX2 ones or four SSE ones; a vectorizable e^x; the clone and inline attributes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace spice_vec {

// Everything a cloned function calls is inlined into it, so each clone vectorizes all of it.
#if defined(__GNUC__)
#define SPICE_INLINE inline __attribute__((always_inline))
#else
#define SPICE_INLINE inline
#endif

// Loops compiled for several instruction sets, one picked at load time.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPICE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPICE_CLONES
#endif

constexpr int kLanes = 16;  // floats per vector value

typedef float f32x16 __attribute__((vector_size(64)));
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

SPICE_INLINE float to_float(float x) { return x; }
SPICE_INLINE float to_float(uint16_t x) {  // bfloat16: the high half of a float32
    uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

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

// A last partial vector is read through a zero-padded copy and written back in part.
SPICE_INLINE f32x16 load_part(const float* p, int64_t n) {
    float tmp[kLanes] = {};
    std::memcpy(tmp, p, n * sizeof(float));
    return load16(tmp);
}
SPICE_INLINE void store_part(float* p, f32x16 v, int64_t n) { std::memcpy(p, &v, n * sizeof(float)); }

typedef int32_t i32x16 __attribute__((vector_size(64)));

// v[i] lane j <-> v[j] lane i (a 16 x 16 transpose in registers): for each block size S = 8, 4, 2, 1,
// rows S apart swap their blocks of S lanes that sit on the other side of the diagonal (64 two-source
// shuffles in all).
template <int S>
SPICE_INLINE void swap_blocks(f32x16* v) {
    i32x16 lo, hi;  // lane j of the lower row of a pair, and of the upper row, in (a, b) = lanes 0-31
    for (int j = 0; j < kLanes; ++j) {
        lo[j] = (j & S) ? kLanes + j - S : j;
        hi[j] = (j & S) ? kLanes + j : j + S;
    }
    for (int i = 0; i < kLanes; ++i)
        if (!(i & S)) {
            const f32x16 a = v[i], b = v[i + S];
            v[i] = __builtin_shuffle(a, b, lo);
            v[i + S] = __builtin_shuffle(a, b, hi);
        }
}
SPICE_INLINE void transpose16(f32x16* v) {
    swap_blocks<8>(v);
    swap_blocks<4>(v);
    swap_blocks<2>(v);
    swap_blocks<1>(v);
}

// e^x for x <= 0 (lane-wise), branch-free: x = n ln2 + r with |r| <= ln2 / 2 (n rounded to nearest
// by the 1.5 * 2^23 trick), e^r by Cephes' degree-7 expf polynomial, 2^n through the exponent bits.
// Relative error below 2e-7 (std::exp's is 6e-8); 0 below -87 (-inf included), where float32
// underflows anyway.
SPICE_INLINE f32x16 exp_nonpositive(f32x16 x) {
    const f32x16 zero = {};
    const f32x16 c = x < -87.f ? zero - 87.f : x;
    const f32x16 n = (c * 1.44269504088896341f + 12582912.f) - 12582912.f;
    const f32x16 r = (c - n * 0.693359375f) + n * 2.12194440e-4f;  // Cody-Waite: ln2 in two parts
    const f32x16 r2 = r * r;
    f32x16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r2 + r + 1.f;
    const i32x16 bits = (__builtin_convertvector(n, i32x16) + 127) << 23;
    f32x16 scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < -87.f ? zero : p * scale;
}

// s[i] = e^(s[i] - shift) for n values with s[i] <= shift; a last partial vector goes through a
// padded copy.
SPICE_INLINE void exp_shifted(float* s, int64_t n, float shift) {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes) store16(s + i, exp_nonpositive(load16(s + i) - shift));
    if (i < n) {
        float tail[kLanes] = {};
        std::memcpy(tail, s + i, (n - i) * sizeof(float));
        const f32x16 e = exp_nonpositive(load16(tail) - shift);
        std::memcpy(s + i, &e, (n - i) * sizeof(float));
    }
}

}  // namespace spice_vec
