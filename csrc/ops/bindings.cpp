// pybind11 module spice_fast._cpu_ops: CPU kernels of the model's layers (rms_norm.h, rope.h, small_gemm.h, swiglu.h)
// and of the engine's token sampling (sampling.h); decode_layers.h runs a decode step's layers in one call.
// Tensors arrive as data pointers with their sizes; spice_fast.kernels.rms_norm, .rope and .swiglu check
// devices, dtypes, shapes and contiguity before calling.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "ops/decode_layers.h"
#include "ops/rms_norm.h"
#include "ops/rope.h"
#include "ops/sampling.h"
#include "ops/small_gemm.h"
#include "ops/swiglu.h"

namespace py = pybind11;

namespace {
const float* in(uintptr_t p) { return reinterpret_cast<const float*>(p); }
float* out(uintptr_t p) { return reinterpret_cast<float*>(p); }
template <typename T>
const T* in_as(uintptr_t p) {
    return reinterpret_cast<const T*>(p);
}
}  // namespace

PYBIND11_MODULE(_cpu_ops, m) {
    m.doc() = "CPU kernels of the model's layers (Python faces: spice_fast.kernels.rms_norm, .rope, .swiglu)";
    m.def(
        "small_gemm",
        [](uintptr_t x, int64_t ldx, uintptr_t w, int64_t ldw, uintptr_t bias, uintptr_t y, int64_t ldy, int64_t m,
           int64_t n, int64_t k, int num_threads, int kernel) {
            if (m < 0 || n < 0 || k <= 0 || ldx < k || ldw < k || ldy < n)
                throw py::value_error("small_gemm: sizes must be non-negative, k positive, strides >= row lengths");
            if (kernel < 0 || kernel > 2)
                throw py::value_error("small_gemm: kernel must be 0 (auto), 1 (dot) or 2 (broadcast), got " +
                                      std::to_string(kernel));
            py::gil_scoped_release release;
            spice_ops::small_gemm(in(x), ldx, in(w), ldw, bias ? in(bias) : nullptr, out(y), ldy, m, n, k,
                                  num_threads, static_cast<spice_ops::GemmKernel>(kernel));
        },
        py::arg("x"), py::arg("ldx"), py::arg("w"), py::arg("ldw"), py::arg("bias"), py::arg("y"), py::arg("ldy"),
        py::arg("m"), py::arg("n"), py::arg("k"), py::arg("num_threads"), py::arg("kernel") = 0);
    m.def(
        "small_gemm_auto_kernel", [](int64_t m) { return static_cast<int>(spice_ops::small_gemm_auto_kernel(m)); },
        py::arg("m"), "the kernel small_gemm runs for m rows by default: 1 (dot) or 2 (broadcast)");
    m.def("small_gemm_vectorized", &spice_ops::small_gemm_vectorized,
          "whether this CPU runs the AVX-512 build of small_gemm");
    m.def(
        "rope",
        [](uintptr_t x, uintptr_t cos, uintptr_t sin, uintptr_t y, int64_t tokens, int64_t heads, int64_t dim,
           bool backward, int num_threads) {
            if (tokens < 0 || heads < 0 || dim <= 0 || dim % 2)
                throw py::value_error("tokens and heads must be non-negative and dim positive and even");
            py::gil_scoped_release release;
            spice_ops::rope(in(x), in(cos), in(sin), out(y), tokens, heads, dim, backward, num_threads);
        },
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("y"), py::arg("tokens"), py::arg("heads"),
        py::arg("dim"), py::arg("backward"), py::arg("num_threads"));
    m.def(
        "rms_norm_forward",
        [](uintptr_t x, uintptr_t w, uintptr_t y, uintptr_t rstd, int64_t rows, int64_t dim, double eps,
           int num_threads) {
            if (rows < 0 || dim <= 0) throw py::value_error("rows must be non-negative and dim positive");
            py::gil_scoped_release release;
            spice_ops::rms_norm_forward(in(x), in(w), out(y), out(rstd), rows, dim, static_cast<float>(eps),
                                        num_threads);
        },
        py::arg("x"), py::arg("w"), py::arg("y"), py::arg("rstd"), py::arg("rows"), py::arg("dim"), py::arg("eps"),
        py::arg("num_threads"));
    m.def(
        "rms_norm_backward",
        [](uintptr_t dy, uintptr_t x, uintptr_t w, uintptr_t rstd, uintptr_t dx, uintptr_t dw, int64_t rows,
           int64_t dim, int num_threads) {
            if (rows < 0 || dim <= 0) throw py::value_error("rows must be non-negative and dim positive");
            py::gil_scoped_release release;
            spice_ops::rms_norm_backward(in(dy), in(x), in(w), in(rstd), out(dx), out(dw), rows, dim, num_threads);
        },
        py::arg("dy"), py::arg("x"), py::arg("w"), py::arg("rstd"), py::arg("dx"), py::arg("dw"), py::arg("rows"),
        py::arg("dim"), py::arg("num_threads"));
    m.def(
        "swiglu_forward",
        [](uintptr_t g, uintptr_t u, uintptr_t h, int64_t n, int num_threads) {
            if (n < 0) throw py::value_error("n must be non-negative");
            py::gil_scoped_release release;
            spice_ops::swiglu_forward(in(g), in(u), out(h), n, num_threads);
        },
        py::arg("g"), py::arg("u"), py::arg("h"), py::arg("n"), py::arg("num_threads"));
    m.def(
        "swiglu_backward",
        [](uintptr_t dh, uintptr_t g, uintptr_t u, uintptr_t dg, uintptr_t du, int64_t n, int num_threads) {
            if (n < 0) throw py::value_error("n must be non-negative");
            py::gil_scoped_release release;
            spice_ops::swiglu_backward(in(dh), in(g), in(u), out(dg), out(du), n, num_threads);
        },
        py::arg("dh"), py::arg("g"), py::arg("u"), py::arg("dg"), py::arg("du"), py::arg("n"),
        py::arg("num_threads"));
    m.def(
        "sample_rows",
        [](uintptr_t logits, int64_t ld, int64_t rows, int64_t vocab, uintptr_t temps, uintptr_t top_ps,
           uintptr_t top_ks, uintptr_t us, uintptr_t tokens, uintptr_t logprobs, int num_threads) {
            if (rows < 0 || vocab <= 0 || (ld < vocab && ld != 0))
                throw py::value_error(
                    "sample_rows: rows must be non-negative, vocab positive, ld >= vocab or 0 (one row for all)");
            py::gil_scoped_release release;
            spice_ops::sample_rows(in(logits), ld, rows, vocab, in(temps), in(top_ps), in_as<int64_t>(top_ks),
                                   in(us), reinterpret_cast<int64_t*>(tokens), out(logprobs), num_threads);
        },
        py::arg("logits"), py::arg("ld"), py::arg("rows"), py::arg("vocab"), py::arg("temps"), py::arg("top_ps"),
        py::arg("top_ks"), py::arg("us"), py::arg("tokens"), py::arg("logprobs"), py::arg("num_threads"));
    m.def(
        "decode_layers",
        [](uintptr_t x, const std::vector<uintptr_t>& layers, int64_t rows, int64_t hidden, int64_t heads,
           int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps, double scale, uintptr_t cos,
           uintptr_t sin, uintptr_t slots, uintptr_t block_tables, uintptr_t context_lens, int64_t table_stride,
           int64_t max_blocks, int64_t num_blocks, int64_t block_size, int num_threads, uintptr_t record,
           uintptr_t record_rows, int64_t record_num_rows, int64_t record_width) {
            if (record != 0 && (record_rows == 0 || record_num_rows <= 0 || record_width <= 0))
                throw py::value_error("decode_layers: a record needs its row indices, rows and width");
            if (rows < 0 || hidden <= 0 || heads <= 0 || kv_heads <= 0 || head_dim <= 0 || head_dim % 2 ||
                intermediate <= 0 || num_blocks <= 0 || block_size <= 0 || max_blocks < 0 || table_stride < max_blocks)
                throw py::value_error("decode_layers: sizes must be positive (head_dim even, table_stride >= max_blocks)");
            std::vector<const float*> ptrs;
            ptrs.reserve(layers.size());
            for (uintptr_t p : layers) ptrs.push_back(reinterpret_cast<const float*>(p));
            for (size_t i = 0; i < ptrs.size(); ++i) {
                const int slot = static_cast<int>(i % spice_ops::kNumLayerTensors);
                const bool optional = slot == spice_ops::kQBias || slot == spice_ops::kKBias ||
                                      slot == spice_ops::kVBias || slot == spice_ops::kOBias ||
                                      slot == spice_ops::kQNorm || slot == spice_ops::kKNorm ||
                                      slot == spice_ops::kGateBias || slot == spice_ops::kUpBias ||
                                      slot == spice_ops::kDownBias;
                if (ptrs[i] == nullptr && !optional)
                    throw py::value_error("decode_layers: tensor " + std::to_string(slot) + " of layer " +
                                          std::to_string(i / spice_ops::kNumLayerTensors) + " is missing");
            }
            const spice_ops::DecodeStep step{rows, hidden, heads, kv_heads, head_dim, intermediate,
                                             static_cast<float>(eps), static_cast<float>(scale), in(cos), in(sin),
                                             reinterpret_cast<const int64_t*>(slots),
                                             reinterpret_cast<const int32_t*>(block_tables),
                                             reinterpret_cast<const int32_t*>(context_lens), table_stride,
                                             max_blocks, num_blocks, block_size, out(record),
                                             reinterpret_cast<const int64_t*>(record_rows), record_num_rows,
                                             record_width};
            py::gil_scoped_release release;
            spice_ops::decode_layers(out(x), ptrs, step, num_threads);
        },
        py::arg("x"), py::arg("layers"), py::arg("rows"), py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"),
        py::arg("head_dim"), py::arg("intermediate"), py::arg("eps"), py::arg("scale"), py::arg("cos"),
        py::arg("sin"), py::arg("slots"), py::arg("block_tables"), py::arg("context_lens"), py::arg("table_stride"),
        py::arg("max_blocks"), py::arg("num_blocks"), py::arg("block_size"), py::arg("num_threads"),
        py::arg("record") = 0, py::arg("record_rows") = 0, py::arg("record_num_rows") = 0,
        py::arg("record_width") = 0);
}
