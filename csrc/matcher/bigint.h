// Bounded exact arithmetic for the matcher: sign-magnitude big integers and unreduced rationals.
//
// Every operation charges a shared Budget (limb operations) and refuses results wider than
// kMaxBits; both throw TooLarge, which the evaluator turns into "not decidable exactly". This keeps
// 1/2004! vs 1/2006! exact while 5^{5^{5^5}} stops after a bounded amount of work.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace spice_match {

constexpr int64_t kMaxBits = 32768;           // widest exact integer (about 9,900 decimal digits)
constexpr int64_t kDefaultBudget = 1500000;  // limb operations per verify call (about 2 ms at most)

struct TooLarge {};

struct Budget {
    int64_t left = kDefaultBudget;
    void charge(int64_t ops) {
        left -= ops;
        if (left < 0) throw TooLarge{};
    }
};

class BigInt {
public:
    BigInt() = default;
    static BigInt from_u64(uint64_t v, bool neg = false);
    // Decimal digits only (no sign); charges the budget.
    static BigInt from_decimal(const std::string& digits, Budget& budget);
    static BigInt pow10(int64_t n, Budget& budget);

    bool is_zero() const { return mag_.empty(); }
    bool neg() const { return neg_; }
    bool is_one() const { return !neg_ && mag_.size() == 1 && mag_[0] == 1; }
    int64_t bit_length() const;
    bool fits_u64() const { return mag_.size() <= 2; }
    uint64_t low_u64() const;
    void set_neg(bool n) { neg_ = n && !is_zero(); }

    friend BigInt add(const BigInt& a, const BigInt& b, Budget& budget);
    friend BigInt sub(const BigInt& a, const BigInt& b, Budget& budget);
    friend BigInt mul(const BigInt& a, const BigInt& b, Budget& budget);
    friend bool operator==(const BigInt& a, const BigInt& b) { return a.neg_ == b.neg_ && a.mag_ == b.mag_; }
    BigInt mul_small(uint32_t m, Budget& budget) const;
    // In place, by a 64-bit factor: factorials multiply several small factors per pass.
    void mul_u64_inplace(uint64_t m, Budget& budget);
    BigInt pow(uint64_t e, Budget& budget) const;
    uint64_t mod_u64(uint64_t m) const;  // of the magnitude
    // Divides the magnitude by d, exactly: caller has checked mod_u64(d) == 0.
    BigInt div_exact_u64(uint64_t d) const;
    // Mantissa in [0.5, 1) and binary exponent of the magnitude (frexp style).
    long double frexp_mag(int64_t* exp2) const;

private:
    void trim();
    static int cmp_mag(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b);
    static std::vector<uint32_t> add_mag(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b);
    static std::vector<uint32_t> sub_mag(const std::vector<uint32_t>& a, const std::vector<uint32_t>& b);
    std::vector<uint32_t> mag_;  // little-endian limbs, no leading zeros
    bool neg_ = false;
};

// num / den with den > 0; reduced by gcd only while both fit in 64 bits (no big division needed:
// equality is decided by cross multiplication).
struct Rational {
    BigInt num = BigInt::from_u64(0);
    BigInt den = BigInt::from_u64(1);

    static Rational integer(int64_t v);
    bool is_zero() const { return num.is_zero(); }
    bool is_integer() const;  // exactly (den divides num), when den fits in 64 bits
    void reduce();
    long double to_ld() const;  // may be 0 or inf when out of long double range
};

Rational radd(const Rational& a, const Rational& b, Budget& budget);
Rational rsub(const Rational& a, const Rational& b, Budget& budget);
Rational rmul(const Rational& a, const Rational& b, Budget& budget);
// Throws std::domain_error on division by zero.
Rational rdiv(const Rational& a, const Rational& b, Budget& budget);
Rational rpow(const Rational& a, int64_t e, Budget& budget);
bool requal(const Rational& a, const Rational& b, Budget& budget);

}  // namespace spice_match
