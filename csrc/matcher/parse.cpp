// Recursive-descent parser for answers; see expr.h. Throws ParseFail internally, returns a reason.
#include <algorithm>
#include <cstring>

#include "matcher/expr.h"

namespace spice_match {

int Expr::add(Node n) {
    if (nodes.size() >= kMaxNodes) throw std::string("too many nodes");
    nodes.push_back(std::move(n));
    return static_cast<int>(nodes.size()) - 1;
}

namespace {

bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

const char* const kFunctions[] = {"sin",    "cos",    "tan",  "cot",  "sec",  "csc",  "arcsin", "arccos",
                                  "arctan", "sinh",   "cosh", "tanh", "ln",   "log",  "exp",    "sqrt",
                                  "abs",    nullptr};
const char* const kGreek[] = {"alpha", "beta",  "gamma", "delta",   "epsilon", "varepsilon", "zeta", "eta",
                              "theta", "vartheta", "iota", "kappa", "lambda", "mu",   "nu",    "xi",
                              "rho",   "sigma", "tau",   "upsilon", "phi",     "varphi", "chi", "psi",
                              "omega", "Gamma", "Delta", "Theta",   "Lambda",  "Xi",  "Sigma", "Phi",
                              "Psi",   "Omega", nullptr};

bool in_list(const std::string& name, const char* const* list) {
    for (const char* const* p = list; *p; ++p)
        if (name == *p) return true;
    return false;
}

class Parser {
public:
    Parser(const std::string& s, Expr& e) : s_(s), e_(e) {}

    int parse_all() {
        int root = parse_list('\0', nullptr, nullptr);
        skip_ws();
        if (pos_ != s_.size()) fail("unexpected character");
        return root;
    }

private:
    struct Guard {
        explicit Guard(Parser& p) : p_(p) {
            if (++p_.depth_ > kMaxDepth) p_.fail("nesting too deep");
        }
        ~Guard() { --p_.depth_; }
        Parser& p_;
    };

    [[noreturn]] void fail(const char* why) { throw std::string(why); }

    void skip_ws() {
        while (pos_ < s_.size() && (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
            ++pos_;
    }
    bool at(const char* lit) {
        skip_ws();
        size_t n = std::strlen(lit);
        if (s_.compare(pos_, n, lit) != 0) return false;
        // A command must not continue with letters: "\in" is not "\infty".
        if (lit[0] == '\\' && is_alpha(lit[n - 1]) && pos_ + n < s_.size() && is_alpha(s_[pos_ + n])) return false;
        return true;
    }
    bool eat(const char* lit) {
        if (!at(lit)) return false;
        pos_ += std::strlen(lit);
        return true;
    }
    char peek() {
        skip_ws();
        return pos_ < s_.size() ? s_[pos_] : '\0';
    }
    std::string command_at() {  // name of the command at pos_, without consuming
        skip_ws();
        if (pos_ >= s_.size() || s_[pos_] != '\\') return "";
        size_t j = pos_ + 1;
        while (j < s_.size() && is_alpha(s_[j])) ++j;
        if (j == pos_ + 1 && j < s_.size()) ++j;
        return s_.substr(pos_ + 1, j - pos_ - 1);
    }

    int node(Kind k, std::vector<int> kids = {}, std::string text = "") {
        Node n;
        n.kind = k;
        n.kids = std::move(kids);
        n.text = std::move(text);
        return e_.add(std::move(n));
    }

    // Items separated by ',' or ';' until the closing delimiter (one char, or "\}" when close2).
    int parse_list(char close, const char* close2, char* closed_by) {
        Guard g(*this);
        std::vector<int> items;
        while (true) {
            skip_ws();
            if (items.empty() && ((close && peek() == close) || (close2 && at(close2)))) break;  // empty
            items.push_back(parse_relation());
            if (peek() == ',' || peek() == ';') {
                ++pos_;
                continue;
            }
            break;
        }
        if (close2) {
            if (!eat(close2)) fail("unclosed set brace");
        } else if (close) {
            char c = peek();
            bool ok = c == close || (close == ')' && c == ']') || (close == ']' && c == ')');
            if (!ok) fail("unclosed bracket");
            ++pos_;
            if (closed_by) *closed_by = c;
        }
        if (!close && !close2) return items.size() == 1 ? items[0] : node(Kind::List, items);
        return node(Kind::List, items);
    }

    int parse_relation() {
        Guard g(*this);
        int lhs = parse_union();
        struct Op {
            const char* lit;
            const char* name;
            bool swap;
        };
        static const Op kOps[] = {{"<=", "<=", false}, {">=", "<=", true},  {"!=", "!=", false},
                                  {"\\le", "<=", false}, {"\\ge", "<=", true}, {"\\ne", "!=", false},
                                  {"\\in", "in", false}, {"\\approx", "=", false}, {"=", "=", false},
                                  {"<", "<", false},     {">", "<", true}};
        for (const Op& op : kOps) {
            if (eat(op.lit)) {
                int rhs = parse_union();
                for (const Op& again : kOps)
                    if (at(again.lit)) fail("chained relation");
                return op.swap ? node(Kind::Rel, {rhs, lhs}, op.name) : node(Kind::Rel, {lhs, rhs}, op.name);
            }
        }
        return lhs;
    }

    int parse_union() {
        int first = parse_additive();
        if (!at("\\cup")) return first;
        std::vector<int> parts{first};
        while (eat("\\cup")) parts.push_back(parse_additive());
        return node(Kind::Union, parts);
    }

    int parse_additive() {
        Guard g(*this);
        std::vector<int> terms{parse_term()};
        int pm = -1;  // a \pm b is the set {a + b, a - b}
        while (true) {
            char c = peek();
            if (pm < 0 && (eat("\\pm") || eat("\\mp"))) {
                pm = parse_term();
            } else if (c == '+') {
                ++pos_;
                terms.push_back(parse_term());
            } else if (c == '-') {
                ++pos_;
                terms.push_back(node(Kind::Neg, {parse_term()}));
            } else {
                break;
            }
        }
        if (pm >= 0) {
            std::vector<int> plus = terms, minus = terms;
            plus.push_back(pm);
            minus.push_back(node(Kind::Neg, {pm}));
            return node(Kind::Set, {node(Kind::Add, plus), node(Kind::Add, minus)});
        }
        return terms.size() == 1 ? terms[0] : node(Kind::Add, terms);
    }

    bool is_int_literal(int n) const {
        const Node& x = e_.nodes[n];
        return x.kind == Kind::Num && x.exp10 == 0 && x.open != '.';
    }
    bool is_int_fraction(int n) const {
        const Node& x = e_.nodes[n];
        if (x.kind != Kind::Mul || x.kids.size() != 2 || x.open != 'f') return false;
        const Node& d = e_.nodes[x.kids[1]];
        return is_int_literal(x.kids[0]) && d.kind == Kind::Inv && is_int_literal(d.kids[0]);
    }

    bool starts_primary() {
        char c = peek();
        if (is_digit(c) || is_alpha(c) || c == '(' || c == '[' || c == '{' || c == '.') return true;
        if (c == '|') return abs_depth_ == 0;
        if (c != '\\') return false;
        std::string cmd = command_at();
        return cmd == "frac" || cmd == "sqrt" || cmd == "pi" || cmd == "infty" || cmd == "binom" || cmd == "{" ||
               in_list(cmd, kFunctions) || in_list(cmd, kGreek);
    }

    int parse_term() {
        Guard g(*this);
        std::vector<int> factors{parse_unary()};
        while (true) {
            if (eat("*") || eat("\\cdot") || eat("\\times") || eat("\\ast")) {
                factors.push_back(parse_unary());
            } else if (eat("/") || eat("\\div")) {
                factors.push_back(node(Kind::Inv, {parse_unary()}));
            } else if (starts_primary()) {
                int f = parse_power();
                // Mixed number: 2\frac{1}{2} is 2 + 1/2.
                if (factors.size() == 1 && is_int_fraction(f)) {
                    int lead = factors[0];
                    bool neg = e_.nodes[lead].kind == Kind::Neg;
                    int whole = neg ? e_.nodes[lead].kids[0] : lead;
                    if (is_int_literal(whole)) {
                        int sum = node(Kind::Add, {whole, f});
                        factors[0] = neg ? node(Kind::Neg, {sum}) : sum;
                        continue;
                    }
                }
                factors.push_back(f);
            } else {
                break;
            }
        }
        return factors.size() == 1 ? factors[0] : node(Kind::Mul, factors);
    }

    int parse_unary() {
        Guard g(*this);
        char c = peek();
        if (c == '-') {
            ++pos_;
            return node(Kind::Neg, {parse_unary()});
        }
        if (c == '+') {
            ++pos_;
            return parse_unary();
        }
        return parse_power();
    }

    int parse_power() {
        Guard g(*this);
        int base = parse_postfix();
        if (peek() == '^') {
            ++pos_;
            int exponent = parse_exponent();
            base = node(Kind::Pow, {base, exponent});
            base = parse_postfix_ops(base);
        }
        return base;
    }

    int parse_exponent() {
        Guard g(*this);
        char c = peek();
        int atom;
        if (c == '-') {
            ++pos_;
            return node(Kind::Neg, {parse_exponent()});
        }
        if (c == '+') {
            ++pos_;
            return parse_exponent();
        }
        if (c == '{') {
            ++pos_;
            atom = parse_group('}');
        } else if (is_alpha(c)) {
            atom = node(Kind::Var, {}, std::string(1, s_[pos_++]));
            if (atom >= 0 && e_.nodes[atom].text == "e") e_.nodes[atom].kind = Kind::E;
        } else {
            atom = parse_primary();
        }
        if (peek() == '^') {
            ++pos_;
            return node(Kind::Pow, {atom, parse_exponent()});
        }
        return atom;
    }

    int parse_group(char close) {
        int inner = parse_list(close, nullptr, nullptr);
        const Node& n = e_.nodes[inner];
        if (n.kind == Kind::List && n.kids.size() == 1) return n.kids[0];
        if (n.kind == Kind::List) e_.nodes[inner].kind = Kind::Set;  // {1,2} written without backslashes
        return inner;
    }

    int parse_postfix() { return parse_postfix_ops(parse_primary()); }

    int parse_postfix_ops(int p) {
        for (int count = 0;; ++count) {
            if (count > 8) fail("too many postfix operators");
            skip_ws();
            if (pos_ < s_.size() && s_[pos_] == '!' && !(pos_ + 1 < s_.size() && s_[pos_ + 1] == '=')) {
                ++pos_;
                p = node(Kind::Fact, {p});
            } else if (pos_ < s_.size() && s_[pos_] == '%') {
                ++pos_;
                p = node(Kind::Percent, {p});
            } else {
                return p;
            }
        }
    }

    int parse_number() {
        size_t start = pos_;
        std::string digits;
        int64_t exp10 = 0;
        bool dot = false;
        while (pos_ < s_.size() && (is_digit(s_[pos_]) || (s_[pos_] == '.' && !dot && pos_ + 1 < s_.size() &&
                                                            is_digit(s_[pos_ + 1])))) {
            if (s_[pos_] == '.') {
                dot = true;
            } else {
                digits += s_[pos_];
                if (dot) --exp10;
            }
            ++pos_;
        }
        if (pos_ == start) fail("expected a number");
        // Scientific notation: 1.5e-3, 2E10.
        if (pos_ < s_.size() && (s_[pos_] == 'e' || s_[pos_] == 'E')) {
            size_t k = pos_ + 1;
            bool neg = false;
            if (k < s_.size() && (s_[k] == '-' || s_[k] == '+')) neg = s_[k++] == '-';
            if (k < s_.size() && is_digit(s_[k])) {
                int64_t ex = 0;
                while (k < s_.size() && is_digit(s_[k])) {
                    if (ex < 100000000) ex = ex * 10 + (s_[k] - '0');
                    ++k;
                }
                exp10 += neg ? -ex : ex;
                pos_ = k;
            }
        }
        size_t nz = digits.find_first_not_of('0');
        Node n;
        n.kind = Kind::Num;
        n.text = nz == std::string::npos ? "0" : digits.substr(nz);
        n.exp10 = n.text == "0" ? 0 : exp10;
        n.open = dot ? '.' : 0;
        return e_.add(std::move(n));
    }

    // \frac and \sqrt arguments: a braced group, or one character / one command.
    int parse_arg() {
        Guard g(*this);
        char c = peek();
        if (c == '{') {
            ++pos_;
            return parse_group('}');
        }
        if (is_digit(c)) {
            Node n;
            n.kind = Kind::Num;
            n.text = std::string(1, s_[pos_++]);
            if (n.text == "0") n.exp10 = 0;
            return e_.add(std::move(n));
        }
        if (is_alpha(c)) {
            std::string name(1, s_[pos_++]);
            return node(name == "e" ? Kind::E : Kind::Var, {}, name);
        }
        if (c == '\\') return parse_primary();
        fail("bad argument");
    }

    std::string subscript() {  // after '_': braced raw text or one character
        char c = peek();
        if (c == '{') {
            size_t close = s_.find('}', pos_);
            if (close == std::string::npos) fail("unclosed subscript");
            std::string sub = s_.substr(pos_ + 1, close - pos_ - 1);
            pos_ = close + 1;
            return sub;
        }
        if (pos_ >= s_.size()) fail("empty subscript");
        return std::string(1, s_[pos_++]);
    }

    int parse_function(const std::string& name) {
        int power = -1, base = -1;
        if (name == "log" && peek() == '_') {
            ++pos_;
            base = parse_arg();
        }
        if (peek() == '^') {
            ++pos_;
            power = parse_exponent();
        }
        int arg;
        char c = peek();
        if (c == '(' || c == '{' || c == '[') {
            arg = parse_primary();
        } else {
            arg = parse_power();
        }
        std::string fname = name == "ln" ? "log" : name;
        int f = base >= 0 ? node(Kind::Func, {arg, base}, fname) : node(Kind::Func, {arg}, fname);
        return power >= 0 ? node(Kind::Pow, {f, power}) : f;
    }

    int parse_primary() {
        Guard g(*this);
        char c = peek();
        if (is_digit(c) || c == '.') return parse_number();
        if (is_alpha(c)) {
            size_t start = pos_;
            while (pos_ < s_.size() && is_alpha(s_[pos_])) ++pos_;
            std::string word = s_.substr(start, pos_ - start);
            if (word.size() >= 2) {
                if (in_list(word, kFunctions)) return parse_function(word);
                if (word == "pi") return node(Kind::Pi);
                if (word == "infty" || word == "inf" || word == "infinity") return node(Kind::Inf);
                if (word.size() >= 3) e_.has_word = true;
            }
            std::vector<int> letters;
            for (char l : word) letters.push_back(node(l == 'e' ? Kind::E : Kind::Var, {}, std::string(1, l)));
            if (peek() == '_') {
                ++pos_;
                Node& last = e_.nodes[letters.back()];
                last.kind = Kind::Var;
                last.text += "_" + subscript();
            }
            return letters.size() == 1 ? letters[0] : node(Kind::Mul, letters);
        }
        if (c == '(' || c == '[') {
            ++pos_;
            char closed = 0;
            int inner = parse_list(c == '(' ? ')' : ']', nullptr, &closed);
            Node& n = e_.nodes[inner];
            if (n.kids.size() == 1 && ((c == '(' && closed == ')') || (c == '[' && closed == ']'))) return n.kids[0];
            if (n.kids.size() < 2) fail("bad bracket");
            n.kind = Kind::Tuple;
            n.open = c;
            n.close = closed;
            return inner;
        }
        if (c == '{') {
            ++pos_;
            return parse_group('}');
        }
        if (c == '|' && abs_depth_ == 0) {
            ++pos_;
            ++abs_depth_;
            int inner = parse_additive();
            --abs_depth_;
            if (peek() != '|') fail("unclosed absolute value");
            ++pos_;
            return node(Kind::Func, {inner}, "abs");
        }
        if (c != '\\') fail("unexpected character");
        std::string cmd = command_at();
        pos_ += 1 + cmd.size();
        if (cmd == "{") {
            int inner = parse_list('\0', "\\}", nullptr);
            e_.nodes[inner].kind = Kind::Set;
            return inner;
        }
        if (cmd == "frac") {
            int num = parse_arg();
            int den = parse_arg();
            int f = node(Kind::Mul, {num, node(Kind::Inv, {den})});
            e_.nodes[f].open = 'f';
            return f;
        }
        if (cmd == "sqrt") {
            if (peek() == '[') {
                ++pos_;
                int index = parse_group(']');
                int arg = parse_arg();
                return node(Kind::Pow, {arg, node(Kind::Inv, {index})});
            }
            return node(Kind::Func, {parse_arg()}, "sqrt");
        }
        if (cmd == "binom") {
            int n = parse_arg();
            int k = parse_arg();
            return node(Kind::Func, {n, k}, "binom");
        }
        if (cmd == "pi") return node(Kind::Pi);
        if (cmd == "infty") return node(Kind::Inf);
        if (in_list(cmd, kFunctions)) return parse_function(cmd);
        if (in_list(cmd, kGreek)) {
            std::string name = "\\" + cmd;
            if (peek() == '_') {
                ++pos_;
                name += "_" + subscript();
            }
            return node(Kind::Var, {}, name);
        }
        fail("unknown command");
    }

    const std::string& s_;
    Expr& e_;
    size_t pos_ = 0;
    int depth_ = 0;
    int abs_depth_ = 0;
};

}  // namespace

bool parse_expr(const std::string& s, Expr* out) {
    out->nodes.clear();
    out->root = -1;
    out->has_word = false;
    out->error.clear();
    if (s.empty()) {
        out->error = "empty answer";
        return false;
    }
    try {
        Parser p(s, *out);
        out->root = p.parse_all();
        return true;
    } catch (const std::string& why) {
        out->error = why;
        out->root = -1;
        return false;
    }
}

std::string canonical(const Expr& e, int id) {
    const Node& n = e.nodes[id];
    auto kids_sorted = [&](bool sort) {
        std::vector<std::string> parts;
        for (int k : n.kids) parts.push_back(canonical(e, k));
        if (sort) std::sort(parts.begin(), parts.end());
        std::string out;
        for (const std::string& p : parts) out += p + ",";
        return out;
    };
    switch (n.kind) {
        case Kind::Num: return "N" + n.text + "e" + std::to_string(n.exp10);
        case Kind::Var: return "V" + n.text;
        case Kind::Pi: return "pi";
        case Kind::E: return "e";
        case Kind::Inf: return "inf";
        case Kind::Add: return "+(" + kids_sorted(true) + ")";
        case Kind::Mul: return "*(" + kids_sorted(true) + ")";
        case Kind::Neg: return "-(" + kids_sorted(false) + ")";
        case Kind::Inv: return "/(" + kids_sorted(false) + ")";
        case Kind::Pow: return "^(" + kids_sorted(false) + ")";
        case Kind::Func: return n.text + "(" + kids_sorted(false) + ")";
        case Kind::Fact: return "!(" + kids_sorted(false) + ")";
        case Kind::Percent: return "%(" + kids_sorted(false) + ")";
        case Kind::Rel: return "R" + n.text + "(" + kids_sorted(false) + ")";
        case Kind::Tuple: return std::string("T") + n.open + kids_sorted(false) + n.close;
        case Kind::Set: return "S{" + kids_sorted(true) + "}";
        case Kind::List: return "L{" + kids_sorted(true) + "}";
        case Kind::Union: return "U{" + kids_sorted(true) + "}";
    }
    return "?";
}

}  // namespace spice_match
