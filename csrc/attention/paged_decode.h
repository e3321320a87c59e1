// Paged decode attention on the CPU: one new query token per sequence attends to its KV blocks,
// read in place from the pool (no gather copy). The math is the one of
// spice_fast.kernels.paged_attention.paged_decode_attention_ref: softmax(q k^T * scale) v over the
// first context_lens[b] positions of sequence b, with the query heads of a KV head handled together,
// scores and the online softmax in float32.
#pragma once

#include <cstdint>

namespace spice_attention {

enum class DType { kFloat32 = 0, kBFloat16 = 1 };

struct DecodeArgs {
    float* out;                  // [num_seqs, num_heads, head_dim] float32
    const void* q;               // [num_seqs, num_heads, head_dim], the cache's dtype
    const void* k_cache;         // [num_blocks, block_size, num_kv_heads, head_dim]
    const void* v_cache;         // same shape
    const int32_t* block_tables; // [num_seqs, table_stride], the first max_blocks columns used
    const int32_t* context_lens; // [num_seqs]
    int64_t num_seqs, num_heads, num_kv_heads, head_dim;
    int64_t num_blocks, block_size, max_blocks, table_stride;
    float scale;
};

// Checks every block index and length (std::invalid_argument naming the bad one), then runs over
// num_threads threads. All tensors must be contiguous.
void paged_decode(const DecodeArgs& args, DType dtype, int num_threads);

}  // namespace spice_attention
