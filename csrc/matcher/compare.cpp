// Answer comparison; see compare.h.
#include "matcher/compare.h"

#include <cmath>

#include "matcher/eval.h"

namespace spice_match {

namespace {

constexpr int kNumPoints = 4;
constexpr size_t kMaxItems = 64;  // elements of a set, list or tuple

// Shared evaluation points: distinct small rationals per variable, the last point negative.
Assignment point(const std::vector<std::string>& names, int k) {
    Assignment a;
    for (size_t i = 0; i < names.size(); ++i) {
        int64_t num = 13 + (17 * static_cast<int64_t>(i) + 31 * k) % 89;
        int64_t den = 7 + 2 * k + static_cast<int64_t>(i % 5);
        Rational q;
        q.num = BigInt::from_u64(static_cast<uint64_t>(num), k == kNumPoints - 1);
        q.den = BigInt::from_u64(static_cast<uint64_t>(den));
        q.reduce();
        a.emplace_back(names[i], q);
    }
    return a;
}

std::vector<std::string> shared_vars(const Expr& pe, int p, const Expr& ge, int g) {
    std::vector<std::string> names;
    collect_vars(pe, p, names);
    collect_vars(ge, g, names);
    return names;
}

bool scalars_equal(const Expr& pe, int p, const Expr& ge, int g, Budget& budget) {
    std::vector<std::string> names = shared_vars(pe, p, ge, g);
    int points = names.empty() ? 1 : kNumPoints, decided = 0;
    for (int k = 0; k < points; ++k) {
        Assignment a = point(names, k);
        Value vp = evaluate(pe, p, a, budget), vg = evaluate(ge, g, a, budget);
        if (!vp.valid && !vg.valid) continue;  // outside both domains at this point
        if (!values_equal(vp, vg, budget)) return false;
        ++decided;
    }
    return decided > 0;
}

// Equations are equal when (lhs - rhs) of one is a constant non-zero multiple of the other's.
bool equations_equal(const Expr& pe, const Node& pr, const Expr& ge, const Node& gr, Budget& budget) {
    std::vector<std::string> names = shared_vars(pe, pr.kids[0], ge, gr.kids[0]);
    collect_vars(pe, pr.kids[1], names);
    collect_vars(ge, gr.kids[1], names);
    int points = names.empty() ? 1 : kNumPoints, decided = 0;
    long double ratio = NAN;
    for (int k = 0; k < points; ++k) {
        Assignment a = point(names, k);
        Value dp = value_sub(evaluate(pe, pr.kids[0], a, budget), evaluate(pe, pr.kids[1], a, budget), budget);
        Value dg = value_sub(evaluate(ge, gr.kids[0], a, budget), evaluate(ge, gr.kids[1], a, budget), budget);
        if (!dp.valid && !dg.valid) continue;
        if (!dp.valid || !dg.valid || dp.inf || dg.inf) return false;
        if (!std::isfinite(dp.ap) || !std::isfinite(dg.ap)) return false;  // too large to decide
        bool zp = is_zeroish(dp), zg = is_zeroish(dg);
        if (zp != zg) return false;
        if (zp) continue;
        long double r = dp.ap / dg.ap;
        if (std::isnan(ratio)) {
            ratio = r;
        } else if (std::fabs(r - ratio) > 1e-9L * std::fabs(ratio)) {
            return false;
        }
        ++decided;
    }
    return decided > 0;
}

bool is_set_like(Kind k) { return k == Kind::Set || k == Kind::List; }

// Every element of each side equals some element of the other.
bool unordered_equal(const Expr& pe, const Node& pn, const Expr& ge, const Node& gn, Budget& budget) {
    if (pn.kids.size() > kMaxItems || gn.kids.size() > kMaxItems) return false;
    for (int pk : pn.kids) {
        bool found = false;
        for (int gk : gn.kids)
            if ((found = answers_equal(pe, pk, ge, gk, budget))) break;
        if (!found) return false;
    }
    for (int gk : gn.kids) {
        bool found = false;
        for (int pk : pn.kids)
            if ((found = answers_equal(pe, pk, ge, gk, budget))) break;
        if (!found) return false;
    }
    return true;
}

bool ordered_equal(const Expr& pe, const Node& pn, const Expr& ge, const Node& gn, Budget& budget) {
    if (pn.kids.size() != gn.kids.size() || pn.kids.size() > kMaxItems) return false;
    for (size_t i = 0; i < pn.kids.size(); ++i)
        if (!answers_equal(pe, pn.kids[i], ge, gn.kids[i], budget)) return false;
    return true;
}

bool is_structure(Kind k) {
    return k == Kind::Rel || k == Kind::Tuple || k == Kind::Set || k == Kind::List || k == Kind::Union;
}

}  // namespace

bool answers_equal(const Expr& pe, int p, const Expr& ge, int g, Budget& budget) {
    const Node& pn = pe.nodes[p];
    const Node& gn = ge.nodes[g];
    if (budget.left <= 0) return false;
    if (canonical(pe, p) == canonical(ge, g)) return true;

    // "x = 5" (or "x \in [1, 2]") against a bare gold value, and the reverse.
    if (pn.kind == Kind::Rel && gn.kind != Kind::Rel && (pn.text == "=" || pn.text == "in") &&
        pe.nodes[pn.kids[0]].kind == Kind::Var)
        return answers_equal(pe, pn.kids[1], ge, g, budget);
    if (gn.kind == Kind::Rel && pn.kind != Kind::Rel && (gn.text == "=" || gn.text == "in") &&
        ge.nodes[gn.kids[0]].kind == Kind::Var)
        return answers_equal(pe, p, ge, gn.kids[1], budget);

    if (pn.kind == Kind::Rel || gn.kind == Kind::Rel) {
        if (pn.kind != gn.kind || pn.text != gn.text) return false;
        bool same_sides = answers_equal(pe, pn.kids[0], ge, gn.kids[0], budget) &&
                          answers_equal(pe, pn.kids[1], ge, gn.kids[1], budget);
        if (same_sides) return true;
        if (pn.text == "=" || pn.text == "!=") {
            if (answers_equal(pe, pn.kids[0], ge, gn.kids[1], budget) &&
                answers_equal(pe, pn.kids[1], ge, gn.kids[0], budget))
                return true;
            return equations_equal(pe, pn, ge, gn, budget);
        }
        return false;
    }
    if (is_set_like(pn.kind) && is_set_like(gn.kind)) return unordered_equal(pe, pn, ge, gn, budget);
    if (pn.kind == Kind::Union && gn.kind == Kind::Union) return unordered_equal(pe, pn, ge, gn, budget);
    if (pn.kind == Kind::Tuple && gn.kind == Kind::Tuple) {
        if (pn.open != gn.open || pn.close != gn.close) return false;
        return ordered_equal(pe, pn, ge, gn, budget);
    }
    // A bare list answering a tuple gold: "1, 2" for "(1, 2)".
    if (pn.kind == Kind::List && gn.kind == Kind::Tuple && gn.open == '(' && gn.close == ')')
        return ordered_equal(pe, pn, ge, gn, budget);
    if (is_structure(pn.kind) || is_structure(gn.kind)) return false;

    if (scalars_equal(pe, p, ge, g, budget)) return true;
    // Percent where one side is a percent: 50\% matches 50 (and 0.5, above).
    if (pn.kind == Kind::Percent && gn.kind != Kind::Percent) return scalars_equal(pe, pn.kids[0], ge, g, budget);
    if (gn.kind == Kind::Percent && pn.kind != Kind::Percent) return scalars_equal(pe, p, ge, gn.kids[0], budget);
    return false;
}

}  // namespace spice_match
