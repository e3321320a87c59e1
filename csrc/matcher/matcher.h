// The matcher's entry points: verify one (prediction, gold) pair, a batch over threads, and the
// well-formedness check of a gold answer. Pure functions of their arguments: thread safe.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace spice_match {

enum class AnswerType : int { Infer = 0, Mcq = 1, Integer = 2, Expression = 3, String = 4 };

// pred: a full model response or a bare answer; gold: a bare answer (a \boxed{} is unwrapped).
bool verify(const std::string& pred, const std::string& gold, AnswerType type);

// Same results as verify pair by pair; num_threads <= 0 means all hardware threads.
std::vector<uint8_t> verify_batch(const std::vector<std::string>& preds, const std::vector<std::string>& golds,
                                  const std::vector<int>& types, int num_threads);

// (ok, reason): whether a gold answer is well formed for its type; reason is empty when ok.
std::pair<bool, std::string> parse_answer(const std::string& text, AnswerType type);

}  // namespace spice_match
