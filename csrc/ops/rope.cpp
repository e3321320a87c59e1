// Rotary position embedding forward and backward in one pass (see rope.h).
#include "ops/rope.h"

#include <algorithm>

#include "parallel.h"
#include "vec.h"

namespace spice_ops {
namespace {

using namespace spice_vec;
using spice_parallel::parallel_ranges;

// One head's row, n values of each half starting at i. The backward is the forward with sin negated
// and taken from the other half.
SPICE_INLINE void rotate(const float* x, const float* c, const float* s, float* y, int64_t half, int64_t i,
                         int64_t n, bool backward) {
    const bool full = n == kLanes;
    auto load = [&](const float* p) { return full ? load16(p) : load_part(p, n); };
    auto store = [&](float* p, f32x16 v) { full ? store16(p, v) : store_part(p, v, n); };
    const f32x16 x1 = load(x + i), x2 = load(x + half + i);
    const f32x16 c1 = load(c + i), c2 = load(c + half + i);
    if (!backward) {
        store(y + i, x1 * c1 - x2 * load(s + i));
        store(y + half + i, x2 * c2 + x1 * load(s + half + i));
    } else {
        store(y + i, x1 * c1 + x2 * load(s + half + i));
        store(y + half + i, x2 * c2 - x1 * load(s + i));
    }
}

SPICE_CLONES void rope_tokens(const float* x, const float* cos, const float* sin, float* y, int64_t heads,
                              int64_t dim, bool backward, int64_t begin, int64_t end) {
    const int64_t half = dim / 2;
    for (int64_t t = begin; t < end; ++t) {
        const float* c = cos + t * dim;
        const float* s = sin + t * dim;
        for (int64_t h = 0; h < heads; ++h) {
            const int64_t off = (t * heads + h) * dim;
            for (int64_t i = 0; i < half; i += kLanes)
                rotate(x + off, c, s, y + off, half, i, std::min<int64_t>(kLanes, half - i), backward);
        }
    }
}

}  // namespace

void rope(const float* x, const float* cos, const float* sin, float* y, int64_t tokens, int64_t heads, int64_t dim,
          bool backward, int num_threads) {
    parallel_ranges(tokens, heads * dim, num_threads, [=](int64_t b, int64_t e) {
        rope_tokens(x, cos, sin, y, heads, dim, backward, b, e);
    });
}

}  // namespace spice_ops
