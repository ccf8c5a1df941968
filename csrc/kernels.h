// Host-side interface of the OScaR CUDA kernels (no torch headers: keeps the .cu builds light).
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace oscar {

struct StoreParams {
  const void* k;            // [rows, P, H, D] model dtype, post-RoPE, un-rotated
  const void* v;            // [rows, P, H, D]
  const int64_t* src_rows;  // [N] row of k/v holding page n, or null: row n
  const int64_t* src_tok;   // [N] first token of page n in k/v seen as [tokens, H, D], or null: src_rows
  const int64_t* page_ids;  // [N] pool page to write; < 0: skip (a decode lane that completes no page)
  int N, P, H;
  int rotate, token_norm;
  // [rows, P] fp32 or null: each token's squared key norm over ALL KV heads, summed beforehand
  // (under tensor parallelism a rank holds only some heads; null: summed here over this call's H)
  const float* norm_sq;
  int32_t* k_codes;         // [pages, H, P/32, D, bits]
  __half* k_scale;          // [pages, H, P/32, D]
  __half* k_zero;
  int32_t* v_codes;         // [pages, H, P, D*bits/32]
  __half* v_scale;          // [pages, H, P, D/32]
  __half* v_zero;
  float* k_norm;            // [pages, P]
};

// Page j of query b is pool page page_table[row_b * row_stride + j * col_stride] >> page_shift with
// row_b = page_rows ? page_rows[b] : b: a plain [B, max_pages] table (col_stride 1, shift 0) or
// SGLang's req_to_token (token slots; col_stride P, shift log2 P: pages are allocated whole).
// Split schedule (static, host-free): at most `splits` CTAs per (query, KV head, head chunk); CTA
// (b, i) derives its page range from num_pages[b] on the device (split_range in decode.cu, twin
// in wrapper.split_schedule). A query with one split writes out (and lse) directly; otherwise its
// splits write part_o/part_lse[b * splits + i] and the combine kernel merges them.
// The packed pool of one layer (layout.py: codes, per-channel K / per-token V scale and zero, K norm).
struct PoolPtrs {
  const int32_t* k_codes;
  const __half* k_scale;
  const __half* k_zero;
  const int32_t* v_codes;
  const __half* v_scale;
  const __half* v_zero;
  const float* k_norm;
};

struct DecodeParams : PoolPtrs {
  const void* q;                // [B, Hq, D] raw (un-rotated) queries
  const int32_t* page_table;
  const int64_t* page_rows;     // [B] or null
  int64_t page_row_stride;
  int page_col_stride, page_shift;
  const int32_t* num_pages;     // [B] packed pages each query sees
  const void* res_k;            // [R, P, H, D] raw partial last pages
  const void* res_v;
  const int64_t* res_rows;      // [B]
  const int32_t* res_len;       // [B], 0..P (0: packed pages only, a chunk prefill's prefix part)
  float* part_o;                // [B * splits, Hq, D] normalized partial outputs (split queries)
  float* part_lse;              // [B * splits, Hq] log2-sum-exp of the partials
  void* out;                    // [B, Hq, D] model dtype
  float* lse;                   // [B, Hq] log2-sum-exp of the scaled logits (FlashInfer's base), or null
  int B, Hq, H, P, splits, q_chunks;
  float sm_scale;
  int rotate;
};

constexpr int kMinSplitStages = 2;  // a split streams at least 2 x 128 tokens (amortizes prologue and merge)

struct ExtendParams : PoolPtrs {
  const void* q;                // [T, Hq, D] raw queries of the step's new tokens
  const int32_t* req_to_token;  // [rows, stride]: page j of a request is req_to_token[row, j*P] / P
  int64_t req_to_token_stride;
  const void* raw_k;            // [N, H, D] the step's raw tokens (each request's residual, then its new ones)
  const void* raw_v;
  const int32_t* req_info;      // [B, 8]: q_start, ext, prefix, raw_off, row, 0, 0, 0
  const int32_t* blk_start;     // [B + 1]: the query blocks of request b are blk_start[b] ..
  void* out;                    // [T, Hq, D] model dtype
  float* lse;                   // [T, Hq] log2-sum-exp, or null
  int B, Hq, H, P, num_blocks, tok_per_blk;
  int rows;                     // MMA rows per CTA (64 or 128): tok_per_blk = rows / (Hq / H)
  float sm_scale;
  int rotate;
  int chunk;                    // 1: chunk prefill (only the cached prefix's pages packed)
  // Key splits (a few query blocks over a long prefix would leave most SMs idle): CTA (block, head,
  // split s) takes the s-th of `splits` equal runs of its block's key tiles (packed, then raw) and,
  // when splits > 1, writes normalized partials that the combine kernel merges into out / lse.
  int splits;                   // 1 .. kMaxExtendSplits
  int T;                        // query tokens of the step (rows of out)
  float* part_o;                // [splits, T, Hq, D] fp32, or null (splits == 1)
  float* part_lse;              // [splits, T, Hq] log2-sum-exp of each partial (-inf: nothing seen)
};
constexpr int kMaxExtendSplits = 32;  // the combine kernel reads one split per lane

// Packed pages -> model-dtype K (rotated, times the token norm) and V, token-major (csrc/dequant.cu).
struct DequantParams : PoolPtrs {
  const int64_t* page_ids;      // [N] pool pages, in output order
  void* out_k;                  // [N * P, H, D] model dtype
  void* out_v;
  int N, P, H;
};

// Up to kMaxMergeParts partial attention states [T, Hq, D] (model dtype) with natural-log lse
// (element (t, hq) at hq * lse_head_stride + t * lse_tok_stride) -> out [T, Hq, D], lse_out [T, Hq]
// (log2-sum-exp, or null).
constexpr int kMaxMergeParts = 3;
struct MergeParams {
  const void* o[kMaxMergeParts];
  const float* lse[kMaxMergeParts];
  int64_t lse_head_stride[kMaxMergeParts], lse_tok_stride[kMaxMergeParts];
  int n, T, Hq;
  void* out;
  float* lse_out;
};

// n row copies, K and V alike (csrc/scratch.cu): dst[dst_idx[i] or i] = src[i] >= 0 ? a[src[i]]
// : b[-1 - src[i]]. A row is `vecs` 16-byte vectors (H * D model-dtype elements); a's rows may be
// strided (a view into the fused qkv projection), b's and dst's are contiguous.
struct CopyRowsParams {
  void* dst_k;
  void* dst_v;
  const int64_t* dst_idx;       // [n] or null
  const void* a_k;
  const void* a_v;
  int64_t a_stride_k, a_stride_v;  // row strides of a, in 16-byte vectors
  const void* b_k;              // or null when every src[i] >= 0
  const void* b_v;
  const int64_t* src;           // [n]
  int n, vecs;
};

void launch_copy_rows(const CopyRowsParams& p, cudaStream_t stream);
void launch_dequant(const DequantParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream);
void launch_merge(const MergeParams& p, int head_dim, bool bf16, cudaStream_t stream);
void launch_store(const StoreParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream);
void launch_decode(const DecodeParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream);
int decode_blocks_per_sm(int head_dim, int bits, bool bf16);
void launch_extend(const ExtendParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream);
// The most extend rows per CTA (128 or 64) whose shared memory the current GPU grants one CTA.
int extend_max_rows(int head_dim, int bits);

}  // namespace oscar
