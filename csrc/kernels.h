// Host-side interface of the OScaR CUDA kernels (no torch headers: keeps the .cu builds light).
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace oscar {

struct StoreParams {
  const void* k;            // [N, P, H, D] model dtype, post-RoPE, un-rotated
  const void* v;            // [N, P, H, D]
  const int64_t* page_ids;  // [N]
  int N, P, H;
  int rotate, token_norm;
  int32_t* k_codes;         // [pages, H, P/32, D, bits]
  __half* k_scale;          // [pages, H, P/32, D]
  __half* k_zero;
  int32_t* v_codes;         // [pages, H, P, D*bits/32]
  __half* v_scale;          // [pages, H, P, D/32]
  __half* v_zero;
  float* k_norm;            // [pages, P]
};

struct DecodeParams {
  const void* q;                // [B, Hq, D] raw (un-rotated) queries
  const int32_t* k_codes;
  const __half* k_scale;
  const __half* k_zero;
  const int32_t* v_codes;
  const __half* v_scale;
  const __half* v_zero;
  const float* k_norm;
  const int32_t* page_table;    // [B, stride]
  int64_t page_table_stride;
  const void* res_k;            // [R, P, H, D] raw partial last pages
  const void* res_v;
  const int64_t* res_rows;      // [B]
  const int32_t* res_len;       // [B], 0..P (0: packed pages only, a chunk prefill's prefix part)
  const int32_t* items;         // [num_items, 4]: request, first page, end page, flags
  const int32_t* item_start;    // [B + 1]: the items of request b are item_start[b] ..
  float* part_o;                // [num_items, Hq, D] normalized partial outputs (split requests)
  float* part_lse;              // [num_items, Hq] log2-sum-exp of the partials
  void* out;                    // [B, Hq, D] model dtype
  float* lse;                   // [B, Hq] log2-sum-exp of the scaled logits (FlashInfer's base), or null
  int B, Hq, H, P, num_items, q_chunks;
  float sm_scale;
  int rotate;
  int any_split;                // some request has several items: run the combine kernel
};

enum ItemFlags { kItemResidual = 1, kItemSole = 2 };

struct ExtendParams {
  const void* q;                // [T, Hq, D] raw queries of the step's new tokens
  const int32_t* k_codes;
  const __half* k_scale;
  const __half* k_zero;
  const int32_t* v_codes;
  const __half* v_scale;
  const __half* v_zero;
  const float* k_norm;
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
};

void launch_store(const StoreParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream);
void launch_decode(const DecodeParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream);
int decode_blocks_per_sm(int head_dim, int bits, bool bf16);
void launch_extend(const ExtendParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream);

}  // namespace oscar
