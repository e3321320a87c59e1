// RMSNorm over the last dimension of float32 rows, forward and backward each in one pass per row:
//   y = w * x * r,  r = 1 / sqrt(mean(x^2) + eps)
//   dx = r * (w * dy) - x * r^3 * mean(w * dy * x),   dw = sum over rows of dy * x * r
// The math of spice_fast.kernels.rms_norm.rms_norm_ref (the model's RMSNorm in plain torch, seven
// element-wise passes forward).
#pragma once

#include <cstdint>

namespace spice_ops {

// x, y, dy, dx: [rows, dim] contiguous; w, dw: [dim]; rstd: [rows] (r of each row, kept for backward).
void rms_norm_forward(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t dim, float eps,
                      int num_threads);
void rms_norm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw,
                       int64_t rows, int64_t dim, int num_threads);

}  // namespace spice_ops
