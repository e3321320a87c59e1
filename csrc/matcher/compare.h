// Structural comparison of two parsed answers: relations, sets, tuples and intervals, percent, and
// scalars by exact value or by evaluation at shared random points.
#pragma once

#include "matcher/bigint.h"
#include "matcher/expr.h"

namespace spice_match {

// pred/gold: roots (or subtrees) of two parsed answers; gold decides set semantics and x = 5.
bool answers_equal(const Expr& pe, int p, const Expr& ge, int g, Budget& budget);

}  // namespace spice_match
