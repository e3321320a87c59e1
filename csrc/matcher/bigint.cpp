// Bounded big integers and rationals; see bigint.h.
#include "matcher/bigint.h"

#include <cmath>
#include <stdexcept>

namespace spice_match {

BigInt BigInt::from_u64(uint64_t v, bool neg) {
    BigInt r;
    while (v) {
        r.mag_.push_back(static_cast<uint32_t>(v));
        v >>= 32;
    }
    r.set_neg(neg);
    return r;
}

BigInt BigInt::from_decimal(const std::string& digits, Budget& budget) {
    if (static_cast<int64_t>(digits.size()) * 10 / 3 > kMaxBits) throw TooLarge{};
    BigInt r;
    size_t i = 0;
    while (i < digits.size()) {
        uint32_t chunk = 0, scale = 1;
        for (int k = 0; k < 9 && i < digits.size(); ++k, ++i) {
            chunk = chunk * 10 + static_cast<uint32_t>(digits[i] - '0');
            scale *= 10;
        }
        r = r.mul_small(scale, budget);
        uint64_t carry = chunk;
        for (size_t j = 0; carry && j < r.mag_.size(); ++j) {
            uint64_t s = static_cast<uint64_t>(r.mag_[j]) + carry;
            r.mag_[j] = static_cast<uint32_t>(s);
            carry = s >> 32;
        }
        if (carry) r.mag_.push_back(static_cast<uint32_t>(carry));
    }
    return r;
}

BigInt BigInt::pow10(int64_t n, Budget& budget) {
    if (n < 0 || n * 10 / 3 > kMaxBits) throw TooLarge{};
    return from_u64(10).pow(static_cast<uint64_t>(n), budget);
}

int64_t BigInt::bit_length() const {
    if (mag_.empty()) return 0;
    uint32_t top = mag_.back();
    int bits = 0;
    while (top) {
        ++bits;
        top >>= 1;
    }
    return static_cast<int64_t>(mag_.size() - 1) * 32 + bits;
}

uint64_t BigInt::low_u64() const {
    uint64_t v = 0;
    if (mag_.size() > 0) v = mag_[0];
    if (mag_.size() > 1) v |= static_cast<uint64_t>(mag_[1]) << 32;
    return v;
}

void BigInt::trim() {
    while (!mag_.empty() && mag_.back() == 0) mag_.pop_back();
    if (mag_.empty()) neg_ = false;
}

int BigInt::cmp_mag(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
    if (a.size() != b.size()) return a.size() < b.size() ? -1 : 1;
    for (size_t i = a.size(); i-- > 0;) {
        if (a[i] != b[i]) return a[i] < b[i] ? -1 : 1;
    }
    return 0;
}

std::vector<uint32_t> BigInt::add_mag(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
    const std::vector<uint32_t>& lo = a.size() < b.size() ? a : b;
    const std::vector<uint32_t>& hi = a.size() < b.size() ? b : a;
    std::vector<uint32_t> r(hi.size() + 1);
    uint64_t carry = 0;
    for (size_t i = 0; i < hi.size(); ++i) {
        uint64_t s = static_cast<uint64_t>(hi[i]) + (i < lo.size() ? lo[i] : 0) + carry;
        r[i] = static_cast<uint32_t>(s);
        carry = s >> 32;
    }
    r[hi.size()] = static_cast<uint32_t>(carry);
    return r;
}

// |a| >= |b| required.
std::vector<uint32_t> BigInt::sub_mag(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b) {
    std::vector<uint32_t> r(a.size());
    int64_t borrow = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        int64_t d = static_cast<int64_t>(a[i]) - (i < b.size() ? b[i] : 0) - borrow;
        borrow = d < 0;
        r[i] = static_cast<uint32_t>(d + (borrow ? (int64_t{1} << 32) : 0));
    }
    return r;
}

BigInt add(const BigInt& a, const BigInt& b, Budget& budget) {
    budget.charge(static_cast<int64_t>(std::max(a.mag_.size(), b.mag_.size())) + 1);
    BigInt r;
    if (a.neg_ == b.neg_) {
        r.mag_ = BigInt::add_mag(a.mag_, b.mag_);
        r.neg_ = a.neg_;
    } else if (BigInt::cmp_mag(a.mag_, b.mag_) >= 0) {
        r.mag_ = BigInt::sub_mag(a.mag_, b.mag_);
        r.neg_ = a.neg_;
    } else {
        r.mag_ = BigInt::sub_mag(b.mag_, a.mag_);
        r.neg_ = b.neg_;
    }
    r.trim();
    if (r.bit_length() > kMaxBits) throw TooLarge{};
    return r;
}

BigInt sub(const BigInt& a, const BigInt& b, Budget& budget) {
    BigInt nb = b;
    nb.set_neg(!b.neg_);
    return add(a, nb, budget);
}

BigInt mul(const BigInt& a, const BigInt& b, Budget& budget) {
    if (a.is_zero() || b.is_zero()) return BigInt{};
    if (a.bit_length() + b.bit_length() > kMaxBits + 1) throw TooLarge{};
    budget.charge(static_cast<int64_t>(a.mag_.size() * b.mag_.size()) + 1);
    BigInt r;
    r.mag_.assign(a.mag_.size() + b.mag_.size(), 0);
    for (size_t i = 0; i < a.mag_.size(); ++i) {
        uint64_t carry = 0;
        const uint64_t ai = a.mag_[i];
        for (size_t j = 0; j < b.mag_.size(); ++j) {
            uint64_t t = ai * b.mag_[j] + r.mag_[i + j] + carry;
            r.mag_[i + j] = static_cast<uint32_t>(t);
            carry = t >> 32;
        }
        r.mag_[i + b.mag_.size()] = static_cast<uint32_t>(carry);
    }
    r.neg_ = a.neg_ != b.neg_;
    r.trim();
    if (r.bit_length() > kMaxBits) throw TooLarge{};
    return r;
}

BigInt BigInt::mul_small(uint32_t m, Budget& budget) const {
    budget.charge(static_cast<int64_t>(mag_.size()) + 1);
    BigInt r;
    r.mag_.reserve(mag_.size() + 1);
    uint64_t carry = 0;
    for (uint32_t limb : mag_) {
        uint64_t t = static_cast<uint64_t>(limb) * m + carry;
        r.mag_.push_back(static_cast<uint32_t>(t));
        carry = t >> 32;
    }
    if (carry) r.mag_.push_back(static_cast<uint32_t>(carry));
    r.neg_ = neg_;
    r.trim();
    if (r.bit_length() > kMaxBits) throw TooLarge{};
    return r;
}

void BigInt::mul_u64_inplace(uint64_t m, Budget& budget) {
    budget.charge(static_cast<int64_t>(mag_.size()) + 1);
    unsigned __int128 carry = 0;
    for (uint32_t& limb : mag_) {
        unsigned __int128 t = static_cast<unsigned __int128>(limb) * m + carry;
        limb = static_cast<uint32_t>(t);
        carry = t >> 32;
    }
    while (carry) {
        mag_.push_back(static_cast<uint32_t>(carry));
        carry >>= 32;
    }
    trim();
    if (bit_length() > kMaxBits) throw TooLarge{};
}

BigInt BigInt::pow(uint64_t e, Budget& budget) const {
    if (e == 0) return from_u64(1);
    if (is_zero()) return BigInt{};
    const int64_t bits = bit_length();
    if (bits > 1 && (e > static_cast<uint64_t>(kMaxBits) ||
                     static_cast<int64_t>(e) * (bits - 1) > kMaxBits)) throw TooLarge{};
    BigInt base = *this, result = from_u64(1);
    if (bits == 1) {  // magnitude one
        result.set_neg(neg_ && (e & 1));
        return result;
    }
    while (true) {
        if (e & 1) result = mul(result, base, budget);
        e >>= 1;
        if (!e) break;
        base = mul(base, base, budget);
    }
    return result;
}

uint64_t BigInt::mod_u64(uint64_t m) const {
    unsigned __int128 rem = 0;
    for (size_t i = mag_.size(); i-- > 0;) rem = ((rem << 32) | mag_[i]) % m;
    return static_cast<uint64_t>(rem);
}

BigInt BigInt::div_exact_u64(uint64_t d) const {
    BigInt r;
    r.mag_.assign(mag_.size(), 0);
    unsigned __int128 rem = 0;
    for (size_t i = mag_.size(); i-- > 0;) {
        unsigned __int128 cur = (rem << 32) | mag_[i];
        r.mag_[i] = static_cast<uint32_t>(cur / d);
        rem = cur % d;
    }
    r.neg_ = neg_;
    r.trim();
    return r;
}

long double BigInt::frexp_mag(int64_t* exp2) const {
    if (mag_.empty()) {
        *exp2 = 0;
        return 0.0L;
    }
    // Top three limbs carry more bits than a long double mantissa holds.
    long double m = 0.0L;
    size_t n = mag_.size();
    size_t take = n < 3 ? n : 3;
    for (size_t k = 0; k < take; ++k) m = m * 4294967296.0L + mag_[n - 1 - k];
    int e = 0;
    m = std::frexp(m, &e);
    *exp2 = e + static_cast<int64_t>(n - take) * 32;
    return m;
}

static uint64_t gcd_u64(uint64_t a, uint64_t b) {
    while (b) {
        uint64_t t = a % b;
        a = b;
        b = t;
    }
    return a;
}

Rational Rational::integer(int64_t v) {
    Rational r;
    r.num = BigInt::from_u64(v < 0 ? static_cast<uint64_t>(-(v + 1)) + 1 : static_cast<uint64_t>(v), v < 0);
    return r;
}

bool Rational::is_integer() const {
    if (den.is_one()) return true;
    if (!den.fits_u64()) return false;
    return num.mod_u64(den.low_u64()) == 0;
}

void Rational::reduce() {
    if (num.is_zero()) {
        den = BigInt::from_u64(1);
        return;
    }
    if (!den.fits_u64() || den.is_one()) return;
    uint64_t d = den.low_u64();
    uint64_t g = gcd_u64(num.mod_u64(d), d);
    if (g > 1) {
        num = num.div_exact_u64(g);
        den = den.div_exact_u64(g);
    }
}

long double Rational::to_ld() const {
    int64_t en = 0, ed = 0;
    long double mn = num.frexp_mag(&en), md = den.frexp_mag(&ed);
    if (mn == 0.0L) return 0.0L;
    int64_t e = en - ed;
    if (e > 20000) e = 20000;
    if (e < -20000) e = -20000;
    long double v = std::ldexp(mn / md, static_cast<int>(e));
    return num.neg() ? -v : v;
}

Rational radd(const Rational& a, const Rational& b, Budget& budget) {
    Rational r;
    if (a.den == b.den) {
        r.num = add(a.num, b.num, budget);
        r.den = a.den;
    } else {
        r.num = add(mul(a.num, b.den, budget), mul(b.num, a.den, budget), budget);
        r.den = mul(a.den, b.den, budget);
    }
    r.reduce();
    return r;
}

Rational rsub(const Rational& a, const Rational& b, Budget& budget) {
    Rational nb = b;
    nb.num.set_neg(!b.num.neg());
    return radd(a, nb, budget);
}

Rational rmul(const Rational& a, const Rational& b, Budget& budget) {
    Rational r;
    r.num = mul(a.num, b.num, budget);
    r.den = mul(a.den, b.den, budget);
    r.reduce();
    return r;
}

Rational rdiv(const Rational& a, const Rational& b, Budget& budget) {
    if (b.num.is_zero()) throw std::domain_error("division by zero");
    Rational r;
    r.num = mul(a.num, b.den, budget);
    r.den = mul(a.den, b.num, budget);
    if (r.den.neg()) {
        r.den.set_neg(false);
        r.num.set_neg(!r.num.neg());
    }
    r.reduce();
    return r;
}

Rational rpow(const Rational& a, int64_t e, Budget& budget) {
    if (e < 0) {
        if (a.num.is_zero()) throw std::domain_error("zero to a negative power");
        Rational inv;
        inv.num = a.den;
        inv.den = a.num;
        inv.num.set_neg(a.num.neg());
        inv.den.set_neg(false);
        return rpow(inv, -e, budget);
    }
    Rational r;
    r.num = a.num.pow(static_cast<uint64_t>(e), budget);
    r.den = a.den.pow(static_cast<uint64_t>(e), budget);
    return r;
}

bool requal(const Rational& a, const Rational& b, Budget& budget) {
    if (a.num.neg() != b.num.neg()) return false;
    if (a.den == b.den) return a.num == b.num;
    return mul(a.num, b.den, budget) == mul(b.num, a.den, budget);
}

}  // namespace spice_match
