// pybind11 module spice_fast._cpu_ops: CPU kernels of the model's layers (swiglu.h).
// Tensors arrive as data pointers with their element count; spice_fast.kernels.swiglu checks devices,
// dtypes, shapes and contiguity before calling.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "ops/swiglu.h"

namespace py = pybind11;

namespace {
const float* in(uintptr_t p) { return reinterpret_cast<const float*>(p); }
float* out(uintptr_t p) { return reinterpret_cast<float*>(p); }
}  // namespace

PYBIND11_MODULE(_cpu_ops, m) {
    m.doc() = "CPU kernels of the model's layers (see spice_fast.kernels.swiglu for the Python face)";
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
}
