// Extraction, LaTeX noise removal, string and multiple-choice rules; see text.h.
#include "matcher/text.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace spice_match {

namespace {

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
bool is_alpha(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
bool is_digit(char c) { return c >= '0' && c <= '9'; }
char lower(char c) { return (c >= 'A' && c <= 'Z') ? static_cast<char>(c - 'A' + 'a') : c; }

// Last occurrence of needle starting at or before `from` (npos when none). libstdc++'s rfind calls
// memcmp at every position, which costs about 10 ns a byte on long responses.
size_t rfind_fast(const std::string& s, const char* needle, size_t from = std::string::npos) {
    const size_t n = std::strlen(needle);
    if (n == 0 || s.size() < n) return std::string::npos;
    size_t i = std::min(from, s.size() - n);
    const char first = needle[0];
    while (true) {
        if (s[i] == first && std::memcmp(s.data() + i, needle, n) == 0) return i;
        if (i == 0) return std::string::npos;
        --i;
    }
}

// Index one past the brace matching s[open] == '{', or npos when unbalanced.
size_t match_brace(const std::string& s, size_t open) {
    int depth = 0;
    for (size_t i = open; i < s.size(); ++i) {
        if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
            ++i;
            continue;
        }
        if (s[i] == '{') ++depth;
        if (s[i] == '}' && --depth == 0) return i + 1;
    }
    return std::string::npos;
}

// Matching close brace for every '{' (npos when unbalanced), in one pass.
std::vector<size_t> brace_matches(const std::string& s) {
    std::vector<size_t> match(s.size(), std::string::npos), stack;
    for (size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == '{' || s[i + 1] == '}')) {
            ++i;
        } else if (s[i] == '{') {
            stack.push_back(i);
        } else if (s[i] == '}' && !stack.empty()) {
            match[stack.back()] = i + 1;
            stack.pop_back();
        }
    }
    return match;
}

std::optional<std::string> last_boxed(const std::string& s) {
    // The usual case (last box balanced) scans once from it; otherwise one pass finds all matches,
    // so a response full of unclosed boxes stays linear.
    std::vector<size_t> matches;
    bool have_matches = false;
    size_t end = s.size();
    // Cached last positions, searched again only once passed: keeps the backward walk linear.
    size_t b = rfind_fast(s, "\\boxed"), f = rfind_fast(s, "\\fbox");
    while (end > 0) {
        if (b != std::string::npos && b >= end) b = end >= 1 ? rfind_fast(s, "\\boxed", end - 1) : std::string::npos;
        if (f != std::string::npos && f >= end) f = end >= 1 ? rfind_fast(s, "\\fbox", end - 1) : std::string::npos;
        size_t at = b == std::string::npos ? f : (f == std::string::npos ? b : std::max(b, f));
        if (at == std::string::npos) return std::nullopt;
        size_t i = at + (at == b ? 6 : 5);
        while (i < s.size() && s[i] == ' ') ++i;
        if (i < s.size() && s[i] == '{') {
            size_t close;
            if (!have_matches) {
                close = match_brace(s, i);
                if (close == std::string::npos) {
                    matches = brace_matches(s);
                    have_matches = true;
                }
            } else {
                close = matches[i];
            }
            if (close != std::string::npos) return s.substr(i + 1, close - i - 2);
        } else if (i > at + 5 && i < s.size() && !is_alpha(s[i]) && s[i] != '}') {
            // "\boxed 5": one token up to the next space or dollar.
            size_t j = i;
            while (j < s.size() && !is_space(s[j]) && s[j] != '$') ++j;
            if (j > i) return s.substr(i, j - i);
        }
        end = at;
    }
    return std::nullopt;
}

std::string strip_answer_tail(std::string t) {
    t = trim(t);
    // Decoration around a phrase answer: "**", "$", ":", trailing period.
    bool changed = true;
    while (changed && !t.empty()) {
        changed = false;
        if (t.front() == ':' || t.front() == '*' || t.front() == '$') {
            t.erase(0, 1);
            changed = true;
        }
        if (!t.empty() && (t.back() == '.' || t.back() == '*' || t.back() == '$')) {
            t.pop_back();
            changed = true;
        }
        t = trim(t);
    }
    return t;
}

void replace_all(std::string& s, const char* from, const char* to) {
    const size_t n = std::strlen(from), m = std::strlen(to);
    size_t at = 0;
    while ((at = s.find(from, at)) != std::string::npos) {
        s.replace(at, n, to);
        at += m;
    }
}

bool is_word_command(const std::string& name, const char* const* list) {
    for (const char* const* p = list; *p; ++p)
        if (name == *p) return true;
    return false;
}

const char* const kDropCommands[] = {"left", "right", "displaystyle", "textstyle", "scriptstyle", "quad",
                                     "qquad", "big", "Big", "bigg", "Bigg", "bigl", "bigr", "Bigl",
                                     "Bigr", "limits", "circ", "degree", "ensuremath", "!", ",", ";",
                                     ":", " ", nullptr};
const char* const kUnwrapCommands[] = {"mathrm", "mathbf", "mathit", "boldsymbol", "mathsf", "mathnormal",
                                       "operatorname", "bm", "mathbb", nullptr};
const char* const kTextCommands[] = {"text", "textbf", "textit", "textrm", "mbox", "hbox", "textnormal",
                                     nullptr};

// Unicode math symbols to their LaTeX spelling; returns bytes consumed (0 when none matched).
size_t map_unicode(const std::string& s, size_t i, std::string& out) {
    struct Map {
        const char* utf8;
        const char* latex;
    };
    static const Map kMaps[] = {{"\xe2\x88\x92", "-"},       {"\xc3\x97", "\\times "}, {"\xc2\xb7", "\\cdot "},
                                {"\xe2\x8b\x85", "\\cdot "}, {"\xcf\x80", "\\pi "},     {"\xe2\x88\x9a", "\\sqrt"},
                                {"\xe2\x89\xa4", "\\le "},   {"\xe2\x89\xa5", "\\ge "}, {"\xe2\x88\x9e", "\\infty "},
                                {"\xc2\xb0", ""},            {"\xe2\x88\xaa", "\\cup "}, {"\xc3\xb7", "\\div "},
                                {"\xe2\x89\xa0", "\\ne "},   {"\xe2\x80\x89", " "},     {"\xc2\xa0", " "}};
    for (const Map& m : kMaps) {
        size_t n = std::strlen(m.utf8);
        if (s.compare(i, n, m.utf8) == 0) {
            out += m.latex;
            return n;
        }
    }
    return 0;
}

// "1,234,567.5" (a lone number with thousands separators) -> "1234567.5"; "0,1" stays.
std::string drop_thousands(const std::string& s) {
    size_t i = 0;
    if (i < s.size() && (s[i] == '-' || s[i] == '+')) ++i;
    size_t start = i;
    while (i < s.size() && is_digit(s[i])) ++i;
    size_t lead = i - start;
    if (lead < 1 || lead > 3 || s[start] == '0') return s;
    int groups = 0;
    while (i + 3 < s.size() + 0 && s[i] == ',' && is_digit(s[i + 1]) && is_digit(s[i + 2]) && is_digit(s[i + 3]) &&
           (i + 4 == s.size() || !is_digit(s[i + 4]))) {
        i += 4;
        ++groups;
    }
    if (i + 3 == s.size() && i < s.size() && s[i] == ',') return s;
    if (!groups) return s;
    if (i < s.size() && s[i] == '.') {
        ++i;
        size_t frac = i;
        while (i < s.size() && is_digit(s[i])) ++i;
        if (i == frac) return s;
    }
    if (i != s.size()) return s;
    std::string out;
    for (char c : s)
        if (c != ',') out += c;
    return out;
}

// "5 cm", "12 apples", "3 m^2": a plain number followed by one unit word; the word goes.
std::string drop_unit_word(const std::string& s) {
    size_t i = 0;
    while (i < s.size() && (is_digit(s[i]) || s[i] == '.' || s[i] == ',' || s[i] == '-' || s[i] == '+' || s[i] == '/'))
        ++i;
    size_t num_end = i;
    if (num_end == 0 || i >= s.size() || !is_space(s[i])) return s;
    while (i < s.size() && is_space(s[i])) ++i;
    size_t word = i;
    while (i < s.size() && is_alpha(s[i])) ++i;
    std::string w = s.substr(word, i - word);
    if (w.size() < 2 || w == "pi" || w == "sqrt" || w == "infty" || w == "inf" || w == "e") return s;
    if (i < s.size() && s[i] == '^') {
        ++i;
        if (i < s.size() && s[i] == '{') ++i;
        while (i < s.size() && is_digit(s[i])) ++i;
        if (i < s.size() && s[i] == '}') ++i;
    }
    return i == s.size() ? s.substr(0, num_end) : s;
}

}  // namespace

std::string trim(const std::string& s) {
    size_t a = 0, b = s.size();
    while (a < b && is_space(s[a])) ++a;
    while (b > a && is_space(s[b - 1])) --b;
    return s.substr(a, b - a);
}

std::optional<std::string> extract_answer(const std::string& full) {
    const std::string s = full.size() > kMaxResponseBytes ? full.substr(full.size() - kMaxResponseBytes) : full;
    if (auto boxed = last_boxed(s)) return trim(*boxed);

    std::string low(s.size(), ' ');
    for (size_t i = 0; i < s.size(); ++i) low[i] = lower(s[i]);
    static const char* const kMarkers[] = {"answer is", "answer:", "####"};
    size_t best = std::string::npos, best_len = 0;
    for (const char* m : kMarkers) {
        size_t at = rfind_fast(low, m);
        if (at != std::string::npos && (best == std::string::npos || at > best)) {
            best = at;
            best_len = std::strlen(m);
        }
    }
    if (best != std::string::npos) {
        size_t from = best + best_len;
        size_t eol = s.find('\n', from);
        std::string t = strip_answer_tail(s.substr(from, eol == std::string::npos ? std::string::npos : eol - from));
        if (!t.empty()) return t;
    }
    // A bold final answer: the last **...** on the last non-empty line.
    size_t end = s.size();
    while (end > 0 && is_space(s[end - 1])) --end;
    size_t line = s.rfind('\n', end == 0 ? 0 : end - 1);
    line = line == std::string::npos ? 0 : line + 1;
    size_t close = end < 2 ? std::string::npos : rfind_fast(s, "**", end - 2);
    if (close != std::string::npos && close >= line + 2) {
        size_t open = close == 0 ? std::string::npos : rfind_fast(s, "**", close - 1);
        if (open != std::string::npos && open >= line && open + 2 < close) {
            std::string t = strip_answer_tail(s.substr(open + 2, close - open - 2));
            if (!t.empty()) return t;
        }
    }
    return std::nullopt;
}

std::string answer_part(const std::string& text) {
    if (auto a = extract_answer(text)) return *a;
    return trim(text.size() > kMaxResponseBytes ? text.substr(text.size() - kMaxResponseBytes) : text);
}

std::string clean_math(const std::string& answer) {
    std::string s = answer;
    replace_all(s, "^{\\circ}", "");
    replace_all(s, "^\\circ", "");
    replace_all(s, "{,}", "");
    replace_all(s, "\\%", "%");
    replace_all(s, "\\$", "");
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
        char c = s[i];
        if (static_cast<unsigned char>(c) >= 0x80) {
            size_t n = map_unicode(s, i, out);
            if (n) {
                i += n;
                continue;
            }
            out += c;
            ++i;
            continue;
        }
        if (c == '$' || c == '~') {
            out += c == '~' ? " " : "";
            ++i;
            continue;
        }
        if (c != '\\') {
            out += c;
            ++i;
            continue;
        }
        size_t j = i + 1;
        while (j < s.size() && is_alpha(s[j])) ++j;
        if (j == i + 1 && j < s.size()) ++j;  // one-character command such as \, or \{
        std::string name = s.substr(i + 1, j - i - 1);
        if (is_word_command(name, kDropCommands)) {
            // \left. and \right. are invisible delimiters.
            if ((name == "left" || name == "right") && j < s.size() && s[j] == '.') ++j;
            out += ' ';
            i = j;
            continue;
        }
        if (name == "\\") {
            out += ' ';
            i = j;
            continue;
        }
        bool text = is_word_command(name, kTextCommands);
        if (text || is_word_command(name, kUnwrapCommands)) {
            size_t k = j;
            while (k < s.size() && s[k] == ' ') ++k;
            if (k < s.size() && s[k] == '{') {
                size_t close = match_brace(s, k);
                if (close != std::string::npos) {
                    std::string inner = trim(s.substr(k + 1, close - k - 2));
                    bool numeric = !inner.empty() && inner.find_first_not_of("0123456789.,-+/ ") == std::string::npos;
                    if (text && !numeric) {
                        // Units and words vanish; "and"/"or" between answers separate them.
                        out += (inner == "and" || inner == "or" || inner == ",") ? "," : " ";
                    } else {
                        out += "{" + inner + "}";
                    }
                    i = close;
                    continue;
                }
            }
            i = j;
            continue;
        }
        if (name == "dfrac" || name == "tfrac" || name == "cfrac") name = "frac";
        if (name == "leq" || name == "leqslant") name = "le";
        if (name == "geq" || name == "geqslant") name = "ge";
        if (name == "neq") name = "ne";
        if (name == "lt" || name == "gt") {
            out += name == "lt" ? "<" : ">";
            i = j;
            continue;
        }
        out += '\\';
        out += name;
        i = j;
    }
    out = trim(out);
    while (!out.empty() && (out.back() == '.' || out.back() == ';')) out = trim(out.substr(0, out.size() - 1));
    return drop_thousands(drop_unit_word(out));
}

std::string normalize_string(const std::string& answer) {
    std::string s = answer.size() > kMaxResponseBytes ? answer.substr(0, kMaxResponseBytes) : answer;
    std::string flat;
    flat.reserve(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
        char c = s[i];
        if (c == '\\') {
            size_t j = i + 1;
            while (j < s.size() && is_alpha(s[j])) ++j;
            std::string name = s.substr(i + 1, j - i - 1);
            if (is_word_command(name, kTextCommands) || is_word_command(name, kUnwrapCommands) || name == "left" ||
                name == "right") {
                i = j - 1;
                continue;
            }
        }
        if (c == '-' || c == '_' || c == '/' || c == '~') c = ' ';
        if (static_cast<unsigned char>(c) < 0x80 && !is_alpha(c) && !is_digit(c) && !is_space(c)) continue;
        flat += lower(c);
    }
    std::string out, word;
    auto flush = [&]() {
        if (!word.empty() && word != "a" && word != "an" && word != "the") {
            if (!out.empty()) out += ' ';
            out += word;
        }
        word.clear();
    };
    for (char c : flat) {
        if (is_space(c))
            flush();
        else
            word += c;
    }
    flush();
    return out;
}

namespace {

// Drops $, \text{}, braces, '*' and surrounding space: "\text{(B)}" -> "(B)".
std::string mcq_flat(const std::string& answer) {
    std::string s = answer.size() > kMaxAnswerBytes ? answer.substr(answer.size() - kMaxAnswerBytes) : answer;
    std::string out;
    for (size_t i = 0; i < s.size(); ++i) {
        char c = s[i];
        if (c == '\\') {
            size_t j = i + 1;
            while (j < s.size() && is_alpha(s[j])) ++j;
            std::string name = s.substr(i + 1, j - i - 1);
            if (is_word_command(name, kTextCommands) || is_word_command(name, kUnwrapCommands) ||
                is_word_command(name, kDropCommands)) {
                i = j - 1;
                continue;
            }
        }
        if (c == '$' || c == '{' || c == '}' || c == '*') continue;
        out += c;
    }
    return trim(out);
}

// "B", "(B)", "B)", "B.", "B:", "[B]" -> B; with rest allowed after a delimiter when allow_rest.
std::optional<char> leading_letter(const std::string& s, bool allow_rest) {
    size_t i = 0;
    bool paren = false;
    if (i < s.size() && (s[i] == '(' || s[i] == '[')) {
        paren = true;
        ++i;
    }
    if (i >= s.size() || !is_alpha(s[i])) return std::nullopt;
    char letter = s[i++];
    bool delim = false;
    if (paren) {
        if (i >= s.size() || (s[i] != ')' && s[i] != ']')) return std::nullopt;
        ++i;
        delim = true;
    }
    if (i < s.size() && (s[i] == ')' || s[i] == '.' || s[i] == ':')) {
        ++i;
        delim = true;
    }
    std::string rest = trim(s.substr(i));
    if (!rest.empty() && !(allow_rest && delim)) return std::nullopt;
    if (letter >= 'a' && letter <= 'z') {
        if (!rest.empty()) return std::nullopt;
        letter = static_cast<char>(letter - 'a' + 'A');
    }
    return letter;
}

}  // namespace

std::optional<char> mcq_letter(const std::string& answer) {
    std::string s = mcq_flat(answer);
    if (auto l = leading_letter(s, true)) return l;
    std::string low(s.size(), ' ');
    for (size_t i = 0; i < s.size(); ++i) low[i] = lower(s[i]);
    size_t best = std::string::npos, len = 0;
    for (const char* kw : {"option", "choice", "answer is", "answer:", "answer"}) {
        size_t at = rfind_fast(low, kw);
        if (at != std::string::npos && (best == std::string::npos || at > best)) {
            best = at;
            len = std::strlen(kw);
        }
    }
    if (best == std::string::npos) return std::nullopt;
    std::string rest = trim(s.substr(best + len));
    while (!rest.empty() && (rest.front() == ':' || rest.front() == ' ')) rest.erase(0, 1);
    size_t k = 0;
    if (k < rest.size() && (rest[k] == '(' || rest[k] == '[')) ++k;
    if (k < rest.size() && rest[k] >= 'A' && rest[k] <= 'Z' && (k + 1 == rest.size() || !is_alpha(rest[k + 1])))
        return rest[k];
    return std::nullopt;
}

bool looks_like_mcq_gold(const std::string& answer) {
    std::string s = mcq_flat(answer);
    auto l = leading_letter(s, false);
    if (!l) return false;
    // A lone lower-case letter is a variable, not a choice.
    for (char c : s)
        if (c >= 'a' && c <= 'z') return false;
    return true;
}

}  // namespace spice_match
