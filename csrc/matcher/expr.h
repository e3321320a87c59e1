// Expression trees of parsed answers and the bounded LaTeX/plain-text parser that builds them.
//
// Sums and products are n-ary (subtraction is Neg, division is Inv) so long chains do not nest;
// parenthesis, power and sign nesting is capped at kMaxDepth, and nodes at kMaxNodes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace spice_match {

constexpr int kMaxDepth = 64;
constexpr size_t kMaxNodes = 4096;

enum class Kind : uint8_t {
    Num,      // text = decimal digits, exp10: value = digits * 10^exp10
    Var,      // text = name
    Pi,
    E,
    Inf,
    Add,      // n-ary
    Mul,      // n-ary
    Neg,
    Inv,
    Pow,      // kids = {base, exponent}
    Func,     // text = name; kids = {argument} or {argument, base} for log
    Fact,
    Percent,  // value / 100
    Rel,      // text = "=", "<", "<=", "!=", "in"; kids = {lhs, rhs}
    Tuple,    // open/close = bracket characters: tuples, points and intervals
    Set,      // \{...\}
    List,     // top-level comma list
    Union,    // \cup
};

struct Node {
    Kind kind;
    std::vector<int> kids;
    std::string text;
    int64_t exp10 = 0;
    char open = 0, close = 0;
};

struct Expr {
    std::vector<Node> nodes;
    int root = -1;
    bool has_word = false;  // a run of three or more letters that is no known function: prose
    std::string error;      // why parsing failed, empty on success

    int add(Node n);
};

// Parses a cleaned answer (see clean_math). Returns false and sets out->error on failure.
bool parse_expr(const std::string& s, Expr* out);

// Canonical text of a subtree: commutative operands sorted. Equal strings mean equal values.
std::string canonical(const Expr& e, int node);

}  // namespace spice_match
