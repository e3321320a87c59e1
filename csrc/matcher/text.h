// Text side of the matcher: answer extraction from model responses, LaTeX noise removal before
// parsing, and the string and multiple-choice rules. All functions take arbitrary bytes (invalid
// UTF-8 included) and do work linear in the (capped) input size.
#pragma once

#include <optional>
#include <string>

namespace spice_match {

constexpr size_t kMaxResponseBytes = 1 << 16;  // extraction looks at the last 64 KiB of a response
constexpr size_t kMaxAnswerBytes = 2000;        // answers longer than this are not parsed as math
constexpr size_t kMaxGoldBytes = 8192;          // a longer gold answer matches nothing

// Content of the last balanced \boxed{...} / \fbox{...}; otherwise the text after the last
// "answer is", "answer:" or "####"; otherwise a bold final answer; nullopt when there is none.
std::optional<std::string> extract_answer(const std::string& text);

// The answer to compare: extracted when the text holds a marker, else the whole text, trimmed.
std::string answer_part(const std::string& text);

// LaTeX noise removed (\left, \!, $, \text{units}, degrees, \dfrac -> \frac, unicode symbols,
// thousands separators of a lone number, trailing periods); the input of the expression parser.
std::string clean_math(const std::string& answer);

// String rule: lower case, punctuation and articles dropped, whitespace collapsed.
std::string normalize_string(const std::string& answer);

// The letter of a multiple-choice answer ("B", "(B)", "B)", "\text{(B)}", "option B", "(B) 42").
std::optional<char> mcq_letter(const std::string& answer);

// True when the gold answer is a lone capital letter (optionally in parentheses or \text{}).
bool looks_like_mcq_gold(const std::string& answer);

std::string trim(const std::string& s);

}  // namespace spice_match
