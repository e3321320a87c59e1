// All decoder layers of one decode step on the CPU in one call: the work of the model's Python layers
// (spice_fast.model.transformer.DecoderLayer over a decode AttentionBatch) for float32 weights and KV
// cache, with each piece the same C++ kernel the Python path calls (rms_norm, small_gemm, rope,
// paged_decode, swiglu), so the step pays no Python and dispatch cost per operation.
//
// Per layer, with h = rms_norm(x):  q, k, v = h Wq^T (+b), h Wk^T (+b), h Wv^T (+b);  q, k = rms_norm
// per head (Qwen3's qk-norm, when given), then rope;  k, v written to the cache slots;  a = paged
// attention over the block tables;  x += a Wo^T (+b);  h = rms_norm(x);  x += swiglu(h Wg^T, h Wu^T) Wd^T.
#pragma once

#include <cstdint>
#include <vector>

namespace spice_ops {

// Pointers of one layer's tensors, in this order (nullptr where the model has none: biases, qk-norms).
enum LayerTensor : int {
    kInputNorm, kQ, kQBias, kK, kKBias, kV, kVBias, kO, kOBias, kQNorm, kKNorm, kPostNorm,
    kGate, kGateBias, kUp, kUpBias, kDown, kDownBias, kKCache, kVCache, kNumLayerTensors
};

struct DecodeStep {
    int64_t rows, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
    const float* cos;             // [rows, head_dim]
    const float* sin;             // [rows, head_dim]
    const int64_t* slots;         // [rows] KV-pool slot of each row's new token
    const int32_t* block_tables;  // [rows, table_stride]
    const int32_t* context_lens;  // [rows]
    int64_t table_stride, max_blocks, num_blocks, block_size;
    // Optional record of the step's GEMM outputs (nullptr: none), for a training pass that reuses them:
    // record[layer][record_rows[r]][...] holds row r's q, k, v, o, gate, up, down products (before
    // qk-norm, RoPE, SwiGLU and the residual adds), record_width floats in that order; rows whose
    // record_rows entry is negative are not recorded. record_num_rows: the record's rows per layer.
    float* record = nullptr;
    const int64_t* record_rows = nullptr;
    int64_t record_num_rows = 0, record_width = 0;
};

// x: [rows, hidden] residual stream, updated in place through every layer. layers: kNumLayerTensors
// pointers per layer; weights [out, in] contiguous, caches [num_blocks, block_size, kv_heads, head_dim].
void decode_layers(float* x, const std::vector<const float*>& layers, const DecodeStep& step, int num_threads);

}  // namespace spice_ops
