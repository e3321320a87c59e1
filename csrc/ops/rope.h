// Rotary position embedding of float32 [tokens, heads, dim] rows in the half-split layout of Hugging
// Face checkpoints, forward and backward in one pass:
//   y[:h] = x[:h] cos[:h] - x[h:] sin[:h],   y[h:] = x[h:] cos[h:] + x[:h] sin[h:]   (h = dim / 2)
//   dx[:h] = dy[:h] cos[:h] + dy[h:] sin[h:], dx[h:] = dy[h:] cos[h:] - dy[:h] sin[:h]
// The math of spice_fast.kernels.rope.rope_ref (x * cos + rotate_half(x) * sin in plain torch).
#pragma once

#include <cstdint>

namespace spice_ops {

// x, y: [tokens, heads, dim] contiguous; cos, sin: [tokens, dim] contiguous; dim even. backward = true
// applies the transposed rotation (dy in x, dx out in y).
void rope(const float* x, const float* cos, const float* sin, float* y, int64_t tokens, int64_t heads, int64_t dim,
          bool backward, int num_threads);

}  // namespace spice_ops
