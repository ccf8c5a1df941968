// The two helpers of the flash prefill path (sglang_oscar/flash.py): packed pages dequantized to model
// dtype, and the merge of partial attention states by their log-sum-exp.
//
// dequant: out_k[n*P + t, h, :] = (code * scale + zero) * norm[t] (the rotated key times its omni-token
// norm, so that q_rot . out_k is the logit the decode kernel computes), out_v[n*P + t, h, :] = code * scale
// + zero. fp32 math with separate roundings (__fmul_rn / __fadd_rn), one rounding to the model dtype:
// bit-identical to quant.load_pages followed by .to(dtype) (flash.dequant_reference).
#include <cuda_runtime.h>
#include <math.h>

#include "common.cuh"
#include "kernels.h"

namespace oscar {
namespace {

constexpr int kThreads = 256;

template <typename T, int D, int BITS>
__global__ void __launch_bounds__(kThreads) dequant_kernel(DequantParams p) {
  constexpr int CPW = 32 / BITS;           // codes per int32 word
  constexpr int VW = D * BITS / 32;        // V words per token and head
  __shared__ float nrm[128];               // P <= 128
  const int n = blockIdx.x, h = blockIdx.y, H = gridDim.y, P = p.P, G = P / 32;
  const int64_t page = p.page_ids[n];
  for (int t = threadIdx.x; t < P; t += kThreads) nrm[t] = p.k_norm[page * P + t];
  __syncthreads();
  T* ok = static_cast<T*>(p.out_k);
  T* ov = static_cast<T*>(p.out_v);
  const int64_t tok0 = int64_t(n) * P;
  // K: one thread per (group, channel); for each of the group's 32 tokens, consecutive threads write
  // consecutive channels of one token row.
  const int64_t kbase = (page * H + h) * G;
  for (int i = threadIdx.x; i < G * D; i += kThreads) {
    const int g = i / D, d = i % D;
    const int64_t f = (kbase + g) * D + d;
    const float s = __half2float(p.k_scale[f]), z = __half2float(p.k_zero[f]);
    uint32_t w[BITS];
#pragma unroll
    for (int b = 0; b < BITS; ++b) w[b] = uint32_t(p.k_codes[f * BITS + b]);
#pragma unroll
    for (int j = 0; j < 32; ++j) {
      const float c = float((w[j / CPW] >> (BITS * (j % CPW))) & ((1u << BITS) - 1));
      const float x = __fmul_rn(__fadd_rn(__fmul_rn(c, s), z), nrm[g * 32 + j]);
      ok[((tok0 + g * 32 + j) * H + h) * D + d] = DT<T>::from_f(x);
    }
  }
  // V: one thread per (token, word): CPW consecutive channels of one 32-channel group.
  const int64_t vbase = (page * H + h) * P;
  for (int i = threadIdx.x; i < P * VW; i += kThreads) {
    const int t = i / VW, w = i % VW;
    const uint32_t word = uint32_t(p.v_codes[(vbase + t) * VW + w]);
    const int c0 = w * CPW;
    const int64_t sg = (vbase + t) * (D / 32) + c0 / 32;
    const float s = __half2float(p.v_scale[sg]), z = __half2float(p.v_zero[sg]);
    uint32_t packed[CPW / 2];
#pragma unroll
    for (int j = 0; j < CPW; j += 2) {
      const float a = __fadd_rn(__fmul_rn(float((word >> (BITS * j)) & ((1u << BITS) - 1)), s), z);
      const float b = __fadd_rn(__fmul_rn(float((word >> (BITS * (j + 1))) & ((1u << BITS) - 1)), s), z);
      packed[j / 2] = DT<T>::pack(a, b);
    }
    uint4* dst = reinterpret_cast<uint4*>(ov + ((tok0 + t) * H + h) * D + c0);
#pragma unroll
    for (int j = 0; j < CPW / 8; ++j)
      dst[j] = make_uint4(packed[4 * j], packed[4 * j + 1], packed[4 * j + 2], packed[4 * j + 3]);
  }
}

// One warp per (token, query head) row: weights exp(lse_i - max) of the parts that saw any key (an
// empty part has lse -inf, or +inf as FlashAttention reports a row without keys), out = sum w_i o_i / sum w_i.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) merge_kernel(MergeParams p) {
  constexpr int E = D / 32;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= int64_t(p.T) * p.Hq) return;
  const int64_t t = row / p.Hq, hq = row % p.Hq;
  float l[kMaxMergeParts], m = -INFINITY;
#pragma unroll
  for (int i = 0; i < kMaxMergeParts; ++i) {
    l[i] = -INFINITY;
    if (i < p.n) {
      const float x = p.lse[i][hq * p.lse_head_stride[i] + t * p.lse_tok_stride[i]];
      l[i] = x == INFINITY ? -INFINITY : x;
      m = fmaxf(m, l[i]);
    }
  }
  float acc[E], sum = 0.f;
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.f;
#pragma unroll
  for (int i = 0; i < kMaxMergeParts; ++i) {
    if (i < p.n && l[i] != -INFINITY) {
      const float w = __expf(l[i] - m);
      sum += w;
      const T* o = static_cast<const T*>(p.o[i]) + row * D;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] += w * DT<T>::to_f(o[lane + 32 * e]);
    }
  }
  const float inv = sum > 0.f ? 1.f / sum : 0.f;
  T* out = static_cast<T*>(p.out) + row * D;
#pragma unroll
  for (int e = 0; e < E; ++e) out[lane + 32 * e] = DT<T>::from_f(acc[e] * inv);
  if (p.lse_out && lane == 0) p.lse_out[row] = sum > 0.f ? (m + logf(sum)) * 1.4426950408889634f : -INFINITY;
}

template <typename T, int D, int BITS>
void dequant_t(const DequantParams& p, cudaStream_t s) {
  if (p.N == 0) return;
  dequant_kernel<T, D, BITS><<<dim3(p.N, p.H), kThreads, 0, s>>>(p);
}

template <typename T, int D>
void merge_t(const MergeParams& p, cudaStream_t s) {
  const int64_t rows = int64_t(p.T) * p.Hq;
  if (rows == 0) return;
  merge_kernel<T, D><<<unsigned((rows + kThreads / 32 - 1) / (kThreads / 32)), kThreads, 0, s>>>(p);
}

template <typename T>
void dequant_dispatch(const DequantParams& p, int D, int bits, cudaStream_t s) {
  if (D == 64) bits == 2 ? dequant_t<T, 64, 2>(p, s) : dequant_t<T, 64, 4>(p, s);
  else bits == 2 ? dequant_t<T, 128, 2>(p, s) : dequant_t<T, 128, 4>(p, s);
}

}  // namespace

void launch_dequant(const DequantParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream) {
  if (bf16) dequant_dispatch<__nv_bfloat16>(p, head_dim, bits, stream);
  else dequant_dispatch<__half>(p, head_dim, bits, stream);
}

void launch_merge(const MergeParams& p, int head_dim, bool bf16, cudaStream_t stream) {
  if (bf16) head_dim == 64 ? merge_t<__nv_bfloat16, 64>(p, stream) : merge_t<__nv_bfloat16, 128>(p, stream);
  else head_dim == 64 ? merge_t<__half, 64>(p, stream) : merge_t<__half, 128>(p, stream);
}

}  // namespace oscar
