// SwiGLU on the CPU, forward and backward each in one pass over float32 rows:
//   h = silu(g) * u,   dg = dh * u * s * (1 + g * (1 - s)),   du = dh * g * s,   s = sigmoid(g).
// The math of spice_fast.kernels.swiglu.swiglu_ref (F.silu(g) * u and its autograd), which runs it as
// separate element-wise passes, each allocating its output.
#pragma once

#include <cstdint>

namespace spice_ops {

// All arrays hold n contiguous float32 values; work is split over up to num_threads threads.
void swiglu_forward(const float* g, const float* u, float* h, int64_t n, int num_threads);
void swiglu_backward(const float* dh, const float* g, const float* u, float* dg, float* du, int64_t n,
                     int num_threads);

}  // namespace spice_ops
