// Exact-or-approximate evaluation; see eval.h.
#include "matcher/eval.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>

namespace spice_match {

namespace {

constexpr int kMaxFactorial = 2500;  // 2500! has about 24,600 bits, under kMaxBits

Value invalid() { return Value{}; }

Value from_exact(Rational q) {
    Value v;
    v.valid = true;
    v.exact = true;
    v.ap = q.to_ld();
    v.q = std::move(q);
    if (!std::isfinite(v.ap)) v.ap = NAN;  // outside long double range: only the exact value is usable
    return v;
}

// mag: the size of the operands the value was computed from; a result far below it is cancellation.
Value from_approx(long double x, long double mag = 0.0L) {
    Value v;
    // Values outside the long double range (or underflowed) are too large to decide.
    if (!std::isfinite(x) || (x != 0.0L && std::fabs(x) < 1e-4000L)) return v;
    v.valid = true;
    v.ap = x;
    v.mag = std::isfinite(mag) ? std::max(std::fabs(x), mag) : std::fabs(x);
    return v;
}

long double mag_of(const Value& v) { return v.exact ? std::fabs(v.ap) : v.mag; }

Value from_inf(int sign) {
    Value v;
    v.valid = true;
    v.inf = sign;
    return v;
}

bool approx_ok(const Value& v) { return v.valid && !v.inf && std::isfinite(v.ap); }

Value add2(const Value& a, const Value& b, Budget& budget) {
    if (!a.valid || !b.valid) return invalid();
    if (a.inf || b.inf) {
        if (a.inf && b.inf && a.inf != b.inf) return invalid();
        return from_inf(a.inf ? a.inf : b.inf);
    }
    if (a.exact && b.exact) return from_exact(radd(a.q, b.q, budget));
    if (!approx_ok(a) || !approx_ok(b)) return invalid();
    return from_approx(a.ap + b.ap, std::max(mag_of(a), mag_of(b)));
}

Value neg(const Value& a) {
    Value v = a;
    if (v.inf) v.inf = -v.inf;
    if (v.exact) v.q.num.set_neg(!v.q.num.neg());
    v.ap = -v.ap;
    return v;
}

int sign_of(const Value& v) {
    if (v.inf) return v.inf;
    if (v.exact) return v.q.is_zero() ? 0 : (v.q.num.neg() ? -1 : 1);
    return v.ap > 0 ? 1 : (v.ap < 0 ? -1 : 0);
}

Value mul2(const Value& a, const Value& b, Budget& budget) {
    if (!a.valid || !b.valid) return invalid();
    if (a.inf || b.inf) {
        int s = sign_of(a) * sign_of(b);
        return s ? from_inf(s) : invalid();
    }
    if (a.exact && b.exact) return from_exact(rmul(a.q, b.q, budget));
    if (!approx_ok(a) || !approx_ok(b)) return invalid();
    return from_approx(a.ap * b.ap, mag_of(a) * mag_of(b));
}

Value inv(const Value& a, Budget& budget) {
    if (!a.valid) return invalid();
    if (a.inf) return from_exact(Rational::integer(0));
    if (a.exact) {
        if (a.q.is_zero()) return invalid();
        return from_exact(rdiv(Rational::integer(1), a.q, budget));
    }
    if (!approx_ok(a) || a.ap == 0.0L) return invalid();
    return from_approx(1.0L / a.ap);
}

bool isqrt_u64(uint64_t n, uint64_t* root) {
    uint64_t r = static_cast<uint64_t>(std::sqrt(static_cast<long double>(n)));
    while (r > 0 && static_cast<unsigned __int128>(r) * r > n) --r;
    while (static_cast<unsigned __int128>(r + 1) * (r + 1) <= n) ++r;
    *root = r;
    return static_cast<unsigned __int128>(r) * r == n;
}

// Exact k-th root of a non-negative rational whose parts fit in 64 bits, when it is rational.
bool exact_root(const Rational& q, int k, Rational* out) {
    if (q.num.neg() || !q.num.fits_u64() || !q.den.fits_u64()) return false;
    uint64_t parts[2] = {q.num.low_u64(), q.den.low_u64()}, roots[2];
    for (int i = 0; i < 2; ++i) {
        if (k == 2) {
            if (!isqrt_u64(parts[i], &roots[i])) return false;
        } else {
            long double r = std::round(std::pow(static_cast<long double>(parts[i]), 1.0L / k));
            if (r < 0 || r > 4294967296.0L) return false;
            uint64_t ri = static_cast<uint64_t>(r);
            unsigned __int128 p = 1;
            for (int j = 0; j < k && p <= parts[i]; ++j) p *= ri;
            if (p != parts[i]) return false;
            roots[i] = ri;
        }
    }
    out->num = BigInt::from_u64(roots[0]);
    out->den = BigInt::from_u64(roots[1]);
    return true;
}

Value power(const Value& b, const Value& e, Budget& budget) {
    if (!b.valid || !e.valid || e.inf) return invalid();
    if (b.inf) {
        if (!e.exact) return invalid();
        int s = sign_of(e);
        if (s < 0) return from_exact(Rational::integer(0));
        if (s == 0) return invalid();
        return from_inf(b.inf > 0 ? 1 : (e.q.is_integer() && e.q.num.mod_u64(2) == 1 && e.q.den.is_one() ? -1 : 1));
    }
    if (e.exact && b.exact) {
        if (e.q.den.is_one()) {
            // Integer exponent: exact, unless the base's magnitude is not 0/1 and the result is too wide.
            const BigInt& n = e.q.num;
            if (b.q.is_zero()) return n.neg() ? invalid() : from_exact(Rational::integer(n.is_zero() ? 1 : 0));
            bool unit = b.q.den.is_one() && (b.q.num.is_one() || b.q.num.bit_length() == 1);
            if (unit) {
                bool odd = n.mod_u64(2) == 1;
                return from_exact(Rational::integer(b.q.num.neg() && odd ? -1 : 1));
            }
            if (!n.fits_u64() || n.low_u64() > static_cast<uint64_t>(kMaxBits)) return invalid();
            int64_t k = static_cast<int64_t>(n.low_u64());
            return from_exact(rpow(b.q, n.neg() ? -k : k, budget));
        }
        // Rational exponent p/k with a small k: exact when the root is rational.
        if (e.q.den.fits_u64() && e.q.den.low_u64() <= 6 && e.q.num.fits_u64() && e.q.num.low_u64() <= 64) {
            Rational root;
            int k = static_cast<int>(e.q.den.low_u64());
            if (exact_root(b.q, k, &root)) {
                int64_t p = static_cast<int64_t>(e.q.num.low_u64());
                return from_exact(rpow(root, e.q.num.neg() ? -p : p, budget));
            }
        }
    }
    if (!approx_ok(b) || !approx_ok(e)) return invalid();
    if (b.ap < 0 && std::floor(e.ap) != e.ap) {
        // Odd roots of negative numbers (x^{1/3}) are real.
        if (e.exact && e.q.den.fits_u64() && e.q.den.low_u64() % 2 == 1) {
            long double r = -std::pow(-b.ap, e.ap);
            bool odd_num = e.q.num.mod_u64(2) == 1;
            return from_approx(odd_num ? r : -r);
        }
        return invalid();
    }
    if (b.ap == 0.0L && e.ap <= 0) return invalid();
    return from_approx(std::pow(b.ap, e.ap), e.ap > 0 ? std::pow(mag_of(b), e.ap) : 0.0L);
}

Value factorial(const Value& a, Budget& budget) {
    if (!a.valid || !a.exact || !a.q.den.is_one() || a.q.num.neg() || !a.q.num.fits_u64() ||
        a.q.num.low_u64() > static_cast<uint64_t>(kMaxFactorial))
        return invalid();
    int n = static_cast<int>(a.q.num.low_u64());
    BigInt acc = BigInt::from_u64(1);
    uint64_t pack = 1;  // product of pending factors, below 2^52 so one more factor (<= 2500) fits
    for (int k = 2; k <= n; ++k) {
        pack *= static_cast<uint64_t>(k);
        if (pack >= (uint64_t{1} << 52)) {
            acc.mul_u64_inplace(pack, budget);
            pack = 1;
        }
    }
    if (pack > 1) acc.mul_u64_inplace(pack, budget);
    Rational r;
    r.num = acc;
    return from_exact(r);
}

Value binom(const Value& n, const Value& k, Budget& budget) {
    if (!n.valid || !k.valid || !n.exact || !k.exact || !n.q.den.is_one() || !k.q.den.is_one() || n.q.num.neg() ||
        k.q.num.neg() || !n.q.num.fits_u64() || !k.q.num.fits_u64())
        return invalid();
    uint64_t nn = n.q.num.low_u64(), kk = k.q.num.low_u64();
    if (kk > nn) return from_exact(Rational::integer(0));
    kk = std::min(kk, nn - kk);
    if (kk > static_cast<uint64_t>(kMaxFactorial) || nn > (uint64_t{1} << 31)) return invalid();
    // C(n, k) = prod (n - k + i) / i, kept exact as an unreduced fraction, reduced as it goes.
    Rational r = Rational::integer(1);
    for (uint64_t i = 1; i <= kk; ++i) {
        r.num = r.num.mul_small(static_cast<uint32_t>(nn - kk + i), budget);
        r.den = r.den.mul_small(static_cast<uint32_t>(i), budget);
        r.reduce();
    }
    return from_exact(r);
}

Value function(const std::string& name, const Value& a, Budget& budget) {
    if (!a.valid) return invalid();
    if (name == "abs") {
        if (a.inf) return from_inf(1);
        Value v = a;
        if (sign_of(a) < 0) v = neg(a);
        return v;
    }
    if (a.inf) return invalid();
    if (name == "sqrt") {
        if (sign_of(a) < 0) return invalid();
        Rational root;
        if (a.exact && exact_root(a.q, 2, &root)) return from_exact(root);
        return approx_ok(a) ? from_approx(std::sqrt(a.ap)) : invalid();
    }
    if (!approx_ok(a)) return invalid();
    long double x = a.ap;
    if (name == "sin") return from_approx(std::sin(x), std::fabs(x));
    if (name == "cos") return from_approx(std::cos(x), std::fabs(x));
    if (name == "tan") return from_approx(std::tan(x), std::fabs(x));
    if (name == "cot") return std::tan(x) == 0 ? invalid() : from_approx(1.0L / std::tan(x));
    if (name == "sec") return std::cos(x) == 0 ? invalid() : from_approx(1.0L / std::cos(x));
    if (name == "csc") return std::sin(x) == 0 ? invalid() : from_approx(1.0L / std::sin(x));
    if (name == "arcsin") return std::fabs(x) > 1 ? invalid() : from_approx(std::asin(x));
    if (name == "arccos") return std::fabs(x) > 1 ? invalid() : from_approx(std::acos(x));
    if (name == "arctan") return from_approx(std::atan(x));
    if (name == "sinh") return from_approx(std::sinh(x));
    if (name == "cosh") return from_approx(std::cosh(x));
    if (name == "tanh") return from_approx(std::tanh(x));
    if (name == "exp") return from_approx(std::exp(x));
    if (name == "log") {
        if (a.exact && a.q.num.is_one() && a.q.den.is_one()) return from_exact(Rational::integer(0));
        return x <= 0 ? invalid() : from_approx(std::log(x), 1.0L);
    }
    (void)budget;
    return invalid();
}

}  // namespace

Value value_sub(const Value& a, const Value& b, Budget& budget) { return add2(a, neg(b), budget); }

Value evaluate(const Expr& e, int id, const Assignment& vars, Budget& budget) {
    const Node& n = e.nodes[id];
    try {
        switch (n.kind) {
            case Kind::Num: {
                Rational q;
                q.num = BigInt::from_decimal(n.text, budget);
                if (n.exp10 > 0) q.num = mul(q.num, BigInt::pow10(n.exp10, budget), budget);
                if (n.exp10 < 0) q.den = BigInt::pow10(-n.exp10, budget);
                q.reduce();
                return from_exact(q);
            }
            case Kind::Var:
                for (const auto& kv : vars)
                    if (kv.first == n.text) return from_exact(kv.second);
                return invalid();
            case Kind::Pi: return from_approx(3.141592653589793238462643383279502884L);
            case Kind::E: return from_approx(2.718281828459045235360287471352662498L);
            case Kind::Inf: return from_inf(1);
            case Kind::Add: {
                Value acc = evaluate(e, n.kids[0], vars, budget);
                for (size_t i = 1; i < n.kids.size() && acc.valid; ++i)
                    acc = add2(acc, evaluate(e, n.kids[i], vars, budget), budget);
                return acc;
            }
            case Kind::Mul: {
                Value acc = evaluate(e, n.kids[0], vars, budget);
                for (size_t i = 1; i < n.kids.size() && acc.valid; ++i)
                    acc = mul2(acc, evaluate(e, n.kids[i], vars, budget), budget);
                return acc;
            }
            case Kind::Neg: return neg(evaluate(e, n.kids[0], vars, budget));
            case Kind::Inv: return inv(evaluate(e, n.kids[0], vars, budget), budget);
            case Kind::Pow:
                return power(evaluate(e, n.kids[0], vars, budget), evaluate(e, n.kids[1], vars, budget), budget);
            case Kind::Func: {
                Value a = evaluate(e, n.kids[0], vars, budget);
                if (n.text == "binom") return binom(a, evaluate(e, n.kids[1], vars, budget), budget);
                if (n.text == "log" && n.kids.size() == 2) {
                    Value base = evaluate(e, n.kids[1], vars, budget);
                    Value num = function("log", a, budget), den = function("log", base, budget);
                    if (!approx_ok(num) || !approx_ok(den) || den.ap == 0.0L) return invalid();
                    return from_approx(num.ap / den.ap);
                }
                return function(n.text, a, budget);
            }
            case Kind::Fact: return factorial(evaluate(e, n.kids[0], vars, budget), budget);
            case Kind::Percent: {
                Value a = evaluate(e, n.kids[0], vars, budget);
                Value hundredth = from_exact(rdiv(Rational::integer(1), Rational::integer(100), budget));
                return mul2(a, hundredth, budget);
            }
            default: return invalid();
        }
    } catch (const TooLarge&) {
        return invalid();
    } catch (const std::domain_error&) {
        return invalid();
    }
}

bool values_equal(const Value& a, const Value& b, Budget& budget) {
    if (!a.valid || !b.valid) return false;
    if (a.inf || b.inf) return a.inf == b.inf;
    if (a.exact && b.exact) {
        try {
            return requal(a.q, b.q, budget);
        } catch (const TooLarge&) {
            return false;
        }
    }
    if (!std::isfinite(a.ap) || !std::isfinite(b.ap)) return false;
    if (a.ap == b.ap) return true;
    long double diff = std::fabs(a.ap - b.ap);
    long double scale = std::max(std::fabs(a.ap), std::fabs(b.ap));
    if (diff <= 1e-6L * scale) return true;
    // A value that should be zero but carries rounding noise (sin(pi)) equals zero; a genuinely
    // tiny value (pi / 10^{20}) does not, because its noise scale is tiny too.
    return is_zeroish(a) && is_zeroish(b);
}

bool is_zeroish(const Value& v) {
    if (!v.valid || v.inf) return false;
    if (v.exact) return v.q.is_zero();
    return std::fabs(v.ap) <= 1e-12L * v.mag;
}

void collect_vars(const Expr& e, int id, std::vector<std::string>& names) {
    const Node& n = e.nodes[id];
    if (n.kind == Kind::Var) {
        if (std::find(names.begin(), names.end(), n.text) == names.end()) names.push_back(n.text);
        return;
    }
    for (int k : n.kids) collect_vars(e, k, names);
}

}  // namespace spice_match
