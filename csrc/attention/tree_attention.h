// Prefix-tree attention on the CPU, forward and backward, for training passes over packed sequences
// (spice_fast.model.attention: AttentionBatch.shared_prefix and plain packed causal batches).
//
// The tokens of a batch are a list of nodes. Each node is a run of tokens that attends to the tokens
// of its ancestor ranges (all of them) and causally to its own tokens; a root has no ancestors. The
// math is softmax(q k^T * scale) v over those keys, per query head, with the query heads of a KV head
// sharing its keys and values, and float32 throughout. The forward also returns each query row's
// log-sum-exp, from which the backward recomputes the probabilities (flash-attention style: no
// [rows x keys] matrix is ever stored).
#pragma once

#include <cstdint>

namespace spice_attention {

struct TreeArgs {
    const float* q;        // [num_tokens, num_heads, head_dim], contiguous
    const float* k;        // [num_tokens, num_kv_heads, head_dim], contiguous
    const float* v;        // same shape as k
    const int64_t* nodes;  // [num_nodes, 4]: first token, tokens, first ancestor range, end of its ranges
    const int64_t* ranges; // [num_ranges, 2]: first token, tokens (a node's ancestors, outermost first)
    int64_t num_tokens, num_heads, num_kv_heads, head_dim, num_nodes, num_ranges;
    float scale;
};

// Checks the head counts, that the nodes split the tokens (each token in exactly one node), that every
// range lies within the tokens and every node's range indices within the ranges; throws
// std::invalid_argument naming the bad one. head_dim must be a multiple of 16.
void check_tree_args(const TreeArgs& args);

// The functions below take arguments that passed check_tree_args. num_threads: at most this many.
// out [num_tokens, num_heads, head_dim] and lse [num_tokens, num_heads].
void tree_attention_forward(const TreeArgs& args, float* out, float* lse, int num_threads);

// Gradients of the forward: dq like q, dk and dv like k (zero where no query attends); all three are
// overwritten. `out` and `lse` are the forward's.
void tree_attention_backward(const TreeArgs& args, const float* out, const float* lse, const float* grad_out,
                             float* dq, float* dk, float* dv, int num_threads);

}  // namespace spice_attention
