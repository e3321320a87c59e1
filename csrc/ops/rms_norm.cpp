// RMSNorm forward and backward in one pass per row (see rms_norm.h).
#include "ops/rms_norm.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <utility>
#include <vector>

#include "parallel.h"
#include "vec.h"

namespace spice_ops {
namespace {

using namespace spice_vec;
using spice_parallel::parallel_ranges;

// Sum over one row of a[i] * b[i].
SPICE_INLINE float dot_row(const float* a, const float* b, int64_t dim) {
    f32x16 acc = {};
    int64_t i = 0;
    for (; i + kLanes <= dim; i += kLanes) acc += load16(a + i) * load16(b + i);
    if (i < dim) acc += load_part(a + i, dim - i) * load_part(b + i, dim - i);
    return hsum(acc);
}

SPICE_CLONES void forward_rows(const float* x, const float* w, float* y, float* rstd, int64_t dim, float eps,
                               int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
        const float* xr = x + row * dim;
        float* yr = y + row * dim;
        const float r = 1.f / std::sqrt(dot_row(xr, xr, dim) / static_cast<float>(dim) + eps);
        rstd[row] = r;
        int64_t i = 0;
        for (; i + kLanes <= dim; i += kLanes) store16(yr + i, load16(w + i) * (load16(xr + i) * r));
        if (i < dim) store_part(yr + i, load_part(w + i, dim - i) * (load_part(xr + i, dim - i) * r), dim - i);
    }
}

// dx of the rows [begin, end); their share of dw is added to dw_part (dim floats, zeroed by the caller).
SPICE_INLINE void backward_block(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                                 float* dw_part, int64_t dim, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
        const float* dyr = dy + row * dim;
        const float* xr = x + row * dim;
        float* dxr = dx + row * dim;
        const float r = rstd[row];
        f32x16 acc = {};  // sum of w * dy * x
        int64_t i = 0;
        for (; i + kLanes <= dim; i += kLanes) acc += load16(w + i) * load16(dyr + i) * load16(xr + i);
        if (i < dim) acc += load_part(w + i, dim - i) * load_part(dyr + i, dim - i) * load_part(xr + i, dim - i);
        const float c = hsum(acc) / static_cast<float>(dim) * r * r * r;
        for (i = 0; i + kLanes <= dim; i += kLanes) {
            const f32x16 xv = load16(xr + i), dyv = load16(dyr + i);
            store16(dxr + i, load16(w + i) * dyv * r - xv * c);
            store16(dw_part + i, load16(dw_part + i) + dyv * xv * r);
        }
        if (i < dim) {
            const int64_t n = dim - i;
            const f32x16 xv = load_part(xr + i, n), dyv = load_part(dyr + i, n);
            store_part(dxr + i, load_part(w + i, n) * dyv * r - xv * c, n);
            store_part(dw_part + i, load_part(dw_part + i, n) + dyv * xv * r, n);
        }
    }
}

SPICE_INLINE void add_into(float* dst, const float* src, int64_t n) {
    for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// dw summed in two levels: rows into a block sum, block sums into the range's sum, so its rounding
// error grows with rows / kBlockRows + kBlockRows rather than with the row count.
constexpr int64_t kBlockRows = 32;

SPICE_CLONES void backward_rows(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                                float* dw_part, float* block, int64_t dim, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; b += kBlockRows) {
        std::fill(block, block + dim, 0.f);
        backward_block(dy, x, w, rstd, dx, block, dim, b, std::min(end, b + kBlockRows));
        add_into(dw_part, block, dim);
    }
}

SPICE_CLONES void add_parts(float* dst, const float* src, int64_t n) { add_into(dst, src, n); }

}  // namespace

void rms_norm_forward(const float* x, const float* w, float* y, float* rstd, int64_t rows, int64_t dim, float eps,
                      int num_threads) {
    parallel_ranges(rows, dim, num_threads,
                    [=](int64_t b, int64_t e) { forward_rows(x, w, y, rstd, dim, eps, b, e); });
}

void rms_norm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx, float* dw,
                       int64_t rows, int64_t dim, int num_threads) {
    // Each range's share of dw is summed on its own, then the shares are added in row order, so dw
    // does not depend on which thread finished first.
    std::mutex lock;
    std::vector<std::pair<int64_t, std::vector<float>>> parts;
    parallel_ranges(rows, dim, num_threads, [&](int64_t b, int64_t e) {
        std::vector<float> part(dim, 0.f), block(dim);
        backward_rows(dy, x, w, rstd, dx, part.data(), block.data(), dim, b, e);
        std::lock_guard<std::mutex> guard(lock);
        parts.emplace_back(b, std::move(part));
    });
    std::sort(parts.begin(), parts.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    std::fill(dw, dw + dim, 0.f);
    for (const auto& part : parts) add_parts(dw, part.second.data(), dim);
}

}  // namespace spice_ops
