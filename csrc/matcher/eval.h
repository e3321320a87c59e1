// Evaluation of expression trees: exact rationals while every operation is rational and within the
// bit and work caps, long double otherwise; an answer too large to decide evaluates to invalid.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "matcher/bigint.h"
#include "matcher/expr.h"

namespace spice_match {

struct Value {
    bool valid = false;
    bool exact = false;  // q holds the exact value
    int inf = 0;         // +1 / -1 for signed infinity (valid, not exact)
    Rational q;
    long double ap = 0.0L;  // approximation, always set when valid and finite
    long double mag = 0.0L;  // approximate values: rounding error is about 1e-18 * mag (cancellation)
};

using Assignment = std::vector<std::pair<std::string, Rational>>;

Value evaluate(const Expr& e, int node, const Assignment& vars, Budget& budget);
Value value_sub(const Value& a, const Value& b, Budget& budget);

// Exact zero, or an approximate value that is rounding noise around zero (sin(pi), sqrt(2)^2 - 2).
bool is_zeroish(const Value& v);

// Exact equality when both are exact, else relative tolerance 1e-6.
bool values_equal(const Value& a, const Value& b, Budget& budget);

// Variable names in a subtree, appended to names (deduplicated).
void collect_vars(const Expr& e, int node, std::vector<std::string>& names);

}  // namespace spice_match
