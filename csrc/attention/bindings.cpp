// pybind11 module spice_fast._cpu_attention: the CPU paged decode attention of paged_decode.h and the
// prefix-tree attention of tree_attention.h. Tensors arrive as data pointers with their shapes;
// spice_fast.kernels.paged_attention and spice_fast.kernels.tree_attention check devices, dtypes,
// shapes and contiguity before calling, and this layer checks every index.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "attention/paged_decode.h"
#include "attention/tree_attention.h"

namespace py = pybind11;

PYBIND11_MODULE(_cpu_attention, m) {
    m.doc() =
        "CPU paged decode attention and prefix-tree attention (see spice_fast.kernels.paged_attention and "
        "spice_fast.kernels.tree_attention for the Python faces)";
    m.def(
        "paged_decode",
        [](uintptr_t out, uintptr_t q, uintptr_t k_cache, uintptr_t v_cache, uintptr_t block_tables,
           uintptr_t context_lens, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
           int64_t num_blocks, int64_t block_size, int64_t max_blocks, int64_t table_stride, double scale,
           int dtype, int num_threads) {
            if (dtype != 0 && dtype != 1) throw py::value_error("dtype must be 0 (float32) or 1 (bfloat16)");
            spice_attention::DecodeArgs args{
                reinterpret_cast<float*>(out), reinterpret_cast<const void*>(q),
                reinterpret_cast<const void*>(k_cache), reinterpret_cast<const void*>(v_cache),
                reinterpret_cast<const int32_t*>(block_tables), reinterpret_cast<const int32_t*>(context_lens),
                num_seqs, num_heads, num_kv_heads, head_dim, num_blocks, block_size, max_blocks, table_stride,
                static_cast<float>(scale)};
            py::gil_scoped_release release;
            spice_attention::paged_decode(args, static_cast<spice_attention::DType>(dtype), num_threads);
        },
        py::arg("out"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("block_tables"),
        py::arg("context_lens"), py::arg("num_seqs"), py::arg("num_heads"), py::arg("num_kv_heads"),
        py::arg("head_dim"), py::arg("num_blocks"), py::arg("block_size"), py::arg("max_blocks"),
        py::arg("table_stride"), py::arg("scale"), py::arg("dtype"), py::arg("num_threads"));

    auto tree_args = [](uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t nodes, uintptr_t ranges, int64_t num_tokens,
                        int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_nodes,
                        int64_t num_ranges, double scale) {
        spice_attention::TreeArgs args{reinterpret_cast<const float*>(q),       reinterpret_cast<const float*>(k),
                                       reinterpret_cast<const float*>(v),       reinterpret_cast<const int64_t*>(nodes),
                                       reinterpret_cast<const int64_t*>(ranges), num_tokens,
                                       num_heads,                               num_kv_heads,
                                       head_dim,                                num_nodes,
                                       num_ranges,                              static_cast<float>(scale)};
        spice_attention::check_tree_args(args);
        return args;
    };
    m.def(
        "tree_forward",
        [tree_args](uintptr_t out, uintptr_t lse, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t nodes,
                    uintptr_t ranges, int64_t num_tokens, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                    int64_t num_nodes, int64_t num_ranges, double scale, int num_threads) {
            const auto args = tree_args(q, k, v, nodes, ranges, num_tokens, num_heads, num_kv_heads, head_dim,
                                        num_nodes, num_ranges, scale);
            py::gil_scoped_release release;
            spice_attention::tree_attention_forward(args, reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse),
                                                    num_threads);
        },
        py::arg("out"), py::arg("lse"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("nodes"), py::arg("ranges"),
        py::arg("num_tokens"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"),
        py::arg("num_nodes"), py::arg("num_ranges"), py::arg("scale"), py::arg("num_threads"));
    m.def(
        "tree_backward",
        [tree_args](uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t out, uintptr_t lse, uintptr_t grad_out,
                    uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t nodes, uintptr_t ranges, int64_t num_tokens,
                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t num_nodes, int64_t num_ranges,
                    double scale, int num_threads) {
            const auto args = tree_args(q, k, v, nodes, ranges, num_tokens, num_heads, num_kv_heads, head_dim,
                                        num_nodes, num_ranges, scale);
            py::gil_scoped_release release;
            spice_attention::tree_attention_backward(
                args, reinterpret_cast<const float*>(out), reinterpret_cast<const float*>(lse),
                reinterpret_cast<const float*>(grad_out), reinterpret_cast<float*>(dq), reinterpret_cast<float*>(dk),
                reinterpret_cast<float*>(dv), num_threads);
        },
        py::arg("dq"), py::arg("dk"), py::arg("dv"), py::arg("out"), py::arg("lse"), py::arg("grad_out"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("nodes"), py::arg("ranges"), py::arg("num_tokens"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("num_nodes"),
        py::arg("num_ranges"), py::arg("scale"), py::arg("num_threads"));
}
