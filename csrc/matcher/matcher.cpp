// verify, verify_batch and parse_answer; see matcher.h.
#include "matcher/matcher.h"

#include <algorithm>
#include <atomic>
#include <exception>
#include <system_error>
#include <thread>

#include "matcher/compare.h"
#include "matcher/eval.h"
#include "matcher/expr.h"
#include "matcher/text.h"

namespace spice_match {

namespace {

bool strings_equal(const std::string& pred, const std::string& gold) {
    std::string g = normalize_string(gold);
    return !g.empty() && normalize_string(pred) == g;
}

bool mcq_equal(const std::string& pred, const std::string& gold) {
    auto g = mcq_letter(gold);
    auto p = mcq_letter(pred);
    return g && p && *g == *p;
}

// Whitespace-free cleaned text: identical answers match even when the parser cannot read them.
std::string squeeze(const std::string& s) {
    std::string out;
    for (char c : s)
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r') out += c;
    return out;
}

bool math_equal(const std::string& pred, const std::string& gold, bool string_fallback) {
    // Over-long answers are compared as text only: parsing cost stays bounded.
    if (pred.size() > kMaxAnswerBytes || gold.size() > kMaxAnswerBytes)
        return pred.size() <= kMaxResponseBytes && squeeze(pred) == squeeze(gold);
    std::string pc = clean_math(pred), gc = clean_math(gold);
    if (!gc.empty() && squeeze(pc) == squeeze(gc)) return true;
    Expr pe, ge;
    bool gp = parse_expr(gc, &ge);
    bool pp = parse_expr(pc, &pe);
    if (gp && pp) {
        Budget budget;
        return answers_equal(pe, pe.root, ge, ge.root, budget);
    }
    return string_fallback && (!gp || ge.has_word) && strings_equal(pred, gold);
}

AnswerType infer(const std::string& gold) {
    if (looks_like_mcq_gold(gold)) return AnswerType::Mcq;
    Expr ge;
    if (gold.size() <= kMaxAnswerBytes && parse_expr(clean_math(gold), &ge) && !ge.has_word)
        return AnswerType::Expression;
    return AnswerType::String;
}

bool verify_impl(const std::string& pred_text, const std::string& gold_text, AnswerType type) {
    if (gold_text.size() > kMaxGoldBytes) return false;  // not a gold answer
    std::string gold = gold_text.find("\\boxed") != std::string::npos || gold_text.find("\\fbox") != std::string::npos
                           ? answer_part(gold_text)
                           : trim(gold_text);
    std::string pred = answer_part(pred_text);
    if (type == AnswerType::Infer) type = infer(gold);
    switch (type) {
        case AnswerType::Mcq: return mcq_equal(pred, gold);
        case AnswerType::String: return strings_equal(pred, gold);
        case AnswerType::Integer:
        case AnswerType::Expression:
        case AnswerType::Infer: break;
    }
    return math_equal(pred, gold, true);
}

}  // namespace

bool verify(const std::string& pred, const std::string& gold, AnswerType type) {
    try {
        return verify_impl(pred, gold, type);
    } catch (const std::exception&) {
        return false;  // out of memory and the like: a wrong answer, never a crash
    }
}

std::vector<uint8_t> verify_batch(const std::vector<std::string>& preds, const std::vector<std::string>& golds,
                                  const std::vector<int>& types, int num_threads) {
    const size_t n = preds.size();
    std::vector<uint8_t> out(n, 0);
    auto type_of = [&](size_t i) { return types.empty() ? AnswerType::Infer : static_cast<AnswerType>(types[i]); };
    unsigned hw = std::max(1u, std::thread::hardware_concurrency());
    size_t workers = num_threads <= 0 ? hw : static_cast<size_t>(num_threads);
    workers = std::min(workers, std::max<size_t>(1, n / 8));
    if (workers <= 1) {
        for (size_t i = 0; i < n; ++i) out[i] = verify(preds[i], golds[i], type_of(i));
        return out;
    }
    // Work stealing in small chunks: pair costs vary by orders of magnitude.
    std::atomic<size_t> next{0};
    constexpr size_t kChunk = 8;
    auto work = [&]() {
        while (true) {
            size_t start = next.fetch_add(kChunk);
            if (start >= n) return;
            size_t stop = std::min(n, start + kChunk);
            for (size_t i = start; i < stop; ++i) out[i] = verify(preds[i], golds[i], type_of(i));
        }
    };
    std::vector<std::thread> pool;
    for (size_t t = 1; t < workers; ++t) {
        try {
            pool.emplace_back(work);
        } catch (const std::system_error&) {
            break;  // no more threads available: the ones started (and this one) share the work
        }
    }
    work();
    for (std::thread& t : pool) t.join();
    return out;
}

std::pair<bool, std::string> parse_answer(const std::string& text, AnswerType type) {
    try {
        std::string answer = trim(text);
        if (answer.empty()) return {false, "empty answer"};
        if (answer.size() > kMaxAnswerBytes) return {false, "answer too long"};
        if (type == AnswerType::Infer) type = infer(answer);
        switch (type) {
            case AnswerType::Mcq: {
                if (!looks_like_mcq_gold(answer)) return {false, "not a single option letter"};
                char l = *mcq_letter(answer);
                if (l < 'A' || l > 'D') return {false, "option letter outside A-D"};
                return {true, ""};
            }
            case AnswerType::String:
                if (normalize_string(answer).empty()) return {false, "empty after normalisation"};
                return {true, ""};
            case AnswerType::Integer:
            case AnswerType::Expression:
            case AnswerType::Infer: break;
        }
        Expr e;
        if (!parse_expr(clean_math(answer), &e)) return {false, "cannot parse expression: " + e.error};
        if (type == AnswerType::Integer) {
            Budget budget;
            Value v = evaluate(e, e.root, {}, budget);
            if (!v.valid) return {false, "not a number (or too large to evaluate)"};
            if (!v.exact || !v.q.is_integer()) return {false, "not an integer"};
        }
        return {true, ""};
    } catch (const std::exception&) {
        return {false, "internal limit reached"};
    }
}

}  // namespace spice_match
