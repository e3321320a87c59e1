// pybind11 module spice_fast._matcher: argument checks and GIL handling only; the matcher lives in
// csrc/matcher/. Text arguments arrive as bytes (Python encodes str, invalid UTF-8 is fine).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "matcher/matcher.h"
#include "matcher/text.h"

namespace py = pybind11;
using spice_match::AnswerType;

namespace {

AnswerType check_type(int code, const char* arg) {
    if (code < 0 || code > 4) throw std::invalid_argument(std::string(arg) + ": unknown answer type code " +
                                                          std::to_string(code));
    return static_cast<AnswerType>(code);
}

}  // namespace

PYBIND11_MODULE(_matcher, m) {
    m.doc() = "C++ answer matcher for SPICE rewards (see spice_fast.match for the Python face)";

    m.def(
        "extract_answer",
        [](const std::string& text) -> py::object {
            std::optional<std::string> a;
            {
                py::gil_scoped_release release;
                a = spice_match::extract_answer(text);
            }
            if (!a) return py::none();
            return py::bytes(*a);
        },
        py::arg("text"));

    m.def(
        "verify",
        [](const std::string& pred, const std::string& gold, int type) {
            AnswerType t = check_type(type, "answer_type");
            py::gil_scoped_release release;
            return spice_match::verify(pred, gold, t);
        },
        py::arg("pred"), py::arg("gold"), py::arg("answer_type") = 0);

    m.def(
        "verify_batch",
        [](const std::vector<std::string>& preds, const std::vector<std::string>& golds, const std::vector<int>& types,
           int num_threads) {
            if (preds.size() != golds.size())
                throw std::invalid_argument("golds: length " + std::to_string(golds.size()) +
                                            " differs from preds length " + std::to_string(preds.size()));
            if (!types.empty() && types.size() != preds.size())
                throw std::invalid_argument("answer_types: length " + std::to_string(types.size()) +
                                            " differs from preds length " + std::to_string(preds.size()));
            for (int t : types) check_type(t, "answer_types");
            if (num_threads < 0) throw std::invalid_argument("num_threads: must be >= 0, got " +
                                                             std::to_string(num_threads));
            std::vector<uint8_t> out;
            {
                py::gil_scoped_release release;
                out = spice_match::verify_batch(preds, golds, types, num_threads);
            }
            py::list result(out.size());
            for (size_t i = 0; i < out.size(); ++i) result[i] = py::bool_(out[i] != 0);
            return result;
        },
        py::arg("preds"), py::arg("golds"), py::arg("answer_types"), py::arg("num_threads") = 0);

    m.def(
        "parse_answer",
        [](const std::string& text, int type) {
            AnswerType t = check_type(type, "answer_type");
            py::gil_scoped_release release;
            return spice_match::parse_answer(text, t);
        },
        py::arg("text"), py::arg("answer_type"));
}
