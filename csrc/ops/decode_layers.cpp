// All decoder layers of a decode step in one call (see decode_layers.h).
#include "ops/decode_layers.h"

#include <cstring>
#include <stdexcept>

#include "attention/paged_decode.h"
#include "ops/rms_norm.h"
#include "ops/rope.h"
#include "ops/small_gemm.h"
#include "ops/swiglu.h"

namespace spice_ops {

void decode_layers(float* x, const std::vector<const float*>& layers, const DecodeStep& s, int num_threads) {
    if (layers.size() % kNumLayerTensors != 0)
        throw std::invalid_argument("decode_layers: the layer list must hold " + std::to_string(kNumLayerTensors) +
                                    " pointers per layer");
    const int64_t rows = s.rows, hid = s.hidden, dim = s.head_dim;
    const int64_t q_dim = s.heads * dim, kv_dim = s.kv_heads * dim, inter = s.intermediate;
    std::vector<float> h(rows * hid), y(rows * hid), rstd(rows * s.heads);  // rows x heads: qk-norm
    std::vector<float> q(rows * q_dim), k(rows * kv_dim), v(rows * kv_dim), t(rows * q_dim), att(rows * q_dim);
    std::vector<float> g(rows * inter), u(rows * inter);
    auto gemm = [&](const float* in, int64_t in_dim, const float* w, const float* b, float* out, int64_t out_dim) {
        small_gemm(in, in_dim, w, in_dim, b, out, out_dim, rows, out_dim, in_dim, num_threads);
    };
    // the record: each GEMM's output rows copied to the record's columns [offset, offset + out_dim)
    const int64_t offsets[] = {0, q_dim, q_dim + kv_dim, q_dim + 2 * kv_dim, q_dim + 2 * kv_dim + hid,
                               q_dim + 2 * kv_dim + hid + inter, q_dim + 2 * kv_dim + hid + 2 * inter};
    if (s.record != nullptr && s.record_width != offsets[6] + hid)
        throw std::invalid_argument("decode_layers: record_width must be q + 2 kv + 2 hidden + 2 intermediate");
    size_t layer = 0;
    auto keep = [&](int which, const float* out, int64_t out_dim) {
        if (s.record == nullptr) return;
        float* base = s.record + static_cast<int64_t>(layer) * s.record_num_rows * s.record_width + offsets[which];
        for (int64_t r = 0; r < rows; ++r)
            if (s.record_rows[r] >= 0)
                std::memcpy(base + s.record_rows[r] * s.record_width, out + r * out_dim, out_dim * sizeof(float));
    };
    auto add_into_x = [&](const float* delta) {
        for (int64_t i = 0; i < rows * hid; ++i) x[i] += delta[i];
    };
    for (; layer < layers.size() / kNumLayerTensors; ++layer) {
        const float* const* p = layers.data() + layer * kNumLayerTensors;
        rms_norm_forward(x, p[kInputNorm], h.data(), rstd.data(), rows, hid, s.eps, num_threads);
        gemm(h.data(), hid, p[kQ], p[kQBias], q.data(), q_dim);
        gemm(h.data(), hid, p[kK], p[kKBias], k.data(), kv_dim);
        gemm(h.data(), hid, p[kV], p[kVBias], v.data(), kv_dim);
        keep(0, q.data(), q_dim);
        keep(1, k.data(), kv_dim);
        keep(2, v.data(), kv_dim);
        if (p[kQNorm] != nullptr) {  // per-head RMSNorm of q and k (Qwen3)
            rms_norm_forward(q.data(), p[kQNorm], t.data(), rstd.data(), rows * s.heads, dim, s.eps, num_threads);
            std::memcpy(q.data(), t.data(), q.size() * sizeof(float));
            rms_norm_forward(k.data(), p[kKNorm], t.data(), rstd.data(), rows * s.kv_heads, dim, s.eps, num_threads);
            std::memcpy(k.data(), t.data(), k.size() * sizeof(float));
        }
        rope(q.data(), s.cos, s.sin, t.data(), rows, s.heads, dim, false, num_threads);
        std::swap(q, t);
        rope(k.data(), s.cos, s.sin, t.data(), rows, s.kv_heads, dim, false, num_threads);
        float* k_cache = const_cast<float*>(p[kKCache]);
        float* v_cache = const_cast<float*>(p[kVCache]);
        for (int64_t r = 0; r < rows; ++r) {
            std::memcpy(k_cache + s.slots[r] * kv_dim, t.data() + r * kv_dim, kv_dim * sizeof(float));
            std::memcpy(v_cache + s.slots[r] * kv_dim, v.data() + r * kv_dim, kv_dim * sizeof(float));
        }
        spice_attention::DecodeArgs a{att.data(), q.data(),   k_cache,      v_cache,       s.block_tables,
                                      s.context_lens, rows,   s.heads,      s.kv_heads,    dim,
                                      s.num_blocks, s.block_size, s.max_blocks, s.table_stride, s.scale};
        spice_attention::paged_decode(a, spice_attention::DType::kFloat32, num_threads);
        gemm(att.data(), q_dim, p[kO], p[kOBias], y.data(), hid);
        keep(3, y.data(), hid);
        add_into_x(y.data());
        rms_norm_forward(x, p[kPostNorm], h.data(), rstd.data(), rows, hid, s.eps, num_threads);
        gemm(h.data(), hid, p[kGate], p[kGateBias], g.data(), inter);
        gemm(h.data(), hid, p[kUp], p[kUpBias], u.data(), inter);
        keep(4, g.data(), inter);
        keep(5, u.data(), inter);
        swiglu_forward(g.data(), u.data(), g.data(), rows * inter, num_threads);
        gemm(g.data(), inter, p[kDown], p[kDownBias], y.data(), hid);
        keep(6, y.data(), hid);
        add_into_x(y.data());
    }
}

}  // namespace spice_ops
