// Fused store of full KV pages: Hadamard on K (per head) + omni-token norm + per-group asymmetric
// quantization + bit packing into the layout of sglang_oscar/layout.py, one pass, rounding once.
// Mirrors quant.store_pages step by step (fp32 math, fp16 scale/zero, codes against the rounded
// fp16 values, round-half-even, clamp; constant group -> scale 0, code 0).
#include <cuda_runtime.h>
#include <math.h>

#include "common.cuh"
#include "hadacore/hadacore.cuh"
#include "kernels.h"

namespace oscar {
namespace {

constexpr float kFp16Max = 65504.f;
constexpr int kStoreWarps = 4;

struct Quant {
  float s, z;      // stored fp16 values, read back as fp32
  __half hs, hz;
};

template <int BITS>
__device__ __forceinline__ Quant make_quant(float lo, float hi) {
  constexpr float qmax = float((1 << BITS) - 1);
  Quant q;
  q.hs = __float2half_rn(fminf((hi - lo) / qmax, kFp16Max));
  q.hz = __float2half_rn(fminf(fmaxf(lo, -kFp16Max), kFp16Max));
  q.s = __half2float(q.hs);
  q.z = __half2float(q.hz);
  return q;
}

template <int BITS>
__device__ __forceinline__ uint32_t code_of(float x, const Quant& q) {
  constexpr float qmax = float((1 << BITS) - 1);
  if (!(q.s > 0.f)) return 0u;
  const float c = fminf(fmaxf(rintf((x - q.z) / q.s), 0.f), qmax);
  return uint32_t(c);
}

// One CTA = one page x one 32-token K group x up to 4 heads, one per warp; each warp keeps its
// head's rotated, normalized 32 x D key tile in shared memory (K groups run along tokens). Every CTA
// of a group computes the group's token norms (over all heads); the first one stores them.
// A decode step waits on a single page's store, so latency matters: every global load of the group
// is issued up front (16-byte vectors, all in flight together; the head's raw K/V staged in shared
// memory) rather than one dependent load per token inside the sequential token loop.
template <typename T, int D, int BITS>
__global__ void __launch_bounds__(kStoreWarps * 32)
store_kernel(StoreParams p) {
  constexpr int E = D / 32;              // channels per lane
  constexpr int CPW = 32 / BITS;         // codes per int32 word
  constexpr int LPG = 32 / E;            // lanes per 32-channel V group
  constexpr int LPW = (CPW / E) > 0 ? (CPW / E) : 1;  // lanes sharing one V word
  static_assert(CPW % E == 0, "a lane's V codes must not straddle words");
  extern __shared__ float smem[];
  float* nrm = smem;                     // [32]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* tile = smem + 32 + warp * 32 * D;
  T* rawk = reinterpret_cast<T*>(smem + 32 + kStoreWarps * 32 * D) + warp * 2 * 32 * D;  // [32][D]
  T* rawv = rawk + 32 * D;                                                                // [32][D]
  constexpr int VPR = D / 8;             // 16-byte vectors per token row of one head

  const int G = p.P / 32;
  const int n = blockIdx.x / G, g = blockIdx.x % G;
  const int64_t page = p.page_ids[n];
  if (page < 0) return;  // nothing to pack for this entry (uniform over the CTA)
  const int H = p.H;
  const T* kin = static_cast<const T*>(p.k);
  const T* vin = static_cast<const T*>(p.v);
  const int64_t tok0 = (p.src_tok ? p.src_tok[n] : (p.src_rows ? p.src_rows[n] : int64_t(n)) * p.P) +
                       g * 32;  // first input token of this group

  // Omni-token norm of each token over all heads and channels (fp32). The Hadamard is orthonormal,
  // so the norm of the raw key equals the norm of the rotated one.
  constexpr int TPW = 32 / kStoreWarps;  // tokens per warp
  float sq[TPW];
#pragma unroll
  for (int k = 0; k < TPW; ++k) sq[k] = 0.f;
  if (p.token_norm && p.norm_sq) {
#pragma unroll
    for (int k = 0; k < TPW; ++k)  // the full sum, once per token: lane 0's copy goes through the shuffles
      sq[k] = lane == 0 ? p.norm_sq[tok0 + warp + k * kStoreWarps] : 0.f;
  } else if (p.token_norm) {
    const int nvec = H * VPR;  // a token's keys over all heads, as 16-byte vectors
    for (int c = lane; c < nvec; c += 32) {
      uint4 u[TPW];
#pragma unroll
      for (int k = 0; k < TPW; ++k)
        u[k] = reinterpret_cast<const uint4*>(kin + (tok0 + warp + k * kStoreWarps) * H * D)[c];
#pragma unroll
      for (int k = 0; k < TPW; ++k) {
        const T* e = reinterpret_cast<const T*>(&u[k]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          const float x = DT<T>::to_f(e[i]);
          sq[k] += x * x;
        }
      }
    }
  }
#pragma unroll
  for (int k = 0; k < TPW; ++k) {
    const int t = warp + k * kStoreWarps;
    float acc = sq[k];
    if (p.token_norm) {
#pragma unroll
      for (int m = 16; m; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
      acc = sqrtf(acc);
      if (!(acc > 0.f) || !isfinite(acc)) acc = 1.f;
    } else {
      acc = 1.f;
    }
    if (lane == 0) {
      nrm[t] = acc;
      if (blockIdx.y == 0) p.k_norm[page * p.P + g * 32 + t] = acc;
    }
  }
  __syncthreads();

  const float hscale = hadacore::inv_sqrt_pow2(D);
  // CTA y takes heads 4y..4y+3: a single page's heads are packed in parallel (a decode step waits on it).
  for (int h = blockIdx.y * kStoreWarps + warp; h < min(H, (blockIdx.y + 1) * kStoreWarps); h += kStoreWarps) {
    float lo[E], hi[E];
#pragma unroll
    for (int i = 0; i < E; ++i) { lo[i] = INFINITY; hi[i] = -INFINITY; }
    // Stage this head's 32 raw K and V rows: D/8 independent 16-byte loads per lane per tensor.
#pragma unroll
    for (int r = 0; r < VPR; ++r) {
      const int c = r * 32 + lane, t = c / VPR, j = c % VPR;
      const int64_t off = ((tok0 + t) * H + h) * D;
      reinterpret_cast<uint4*>(rawk + t * D)[j] = reinterpret_cast<const uint4*>(kin + off)[j];
      reinterpret_cast<uint4*>(rawv + t * D)[j] = reinterpret_cast<const uint4*>(vin + off)[j];
    }
    __syncwarp();
    for (int t = 0; t < 32; ++t) {
      // ---- K: rotate, normalize, stage in shared memory, track per-channel range
      float x[E];
#pragma unroll
      for (int i = 0; i < E; ++i) x[i] = DT<T>::to_f(rawk[t * D + lane * E + i]);
      if (p.rotate) hadacore::warp_fwht<E>(x, hscale);
      const float nt = nrm[t];
#pragma unroll
      for (int i = 0; i < E; ++i) {
        if (p.token_norm) x[i] = x[i] / nt;
        tile[t * D + lane * E + i] = x[i];
        lo[i] = fminf(lo[i], x[i]);
        hi[i] = fmaxf(hi[i], x[i]);
      }
      // ---- V: per token, 32-channel groups spread over LPG lanes
      float y[E];
      float vlo = INFINITY, vhi = -INFINITY;
#pragma unroll
      for (int i = 0; i < E; ++i) {
        y[i] = DT<T>::to_f(rawv[t * D + lane * E + i]);
        vlo = fminf(vlo, y[i]);
        vhi = fmaxf(vhi, y[i]);
      }
#pragma unroll
      for (int m = 1; m < LPG; m <<= 1) {
        vlo = fminf(vlo, __shfl_xor_sync(0xffffffffu, vlo, m));
        vhi = fmaxf(vhi, __shfl_xor_sync(0xffffffffu, vhi, m));
      }
      const Quant vq = make_quant<BITS>(vlo, vhi);
      uint32_t word = 0;
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const int c = lane * E + i;
        word |= code_of<BITS>(y[i], vq) << ((c * BITS) & 31);
      }
#pragma unroll
      for (int m = 1; m < LPW; m <<= 1) word |= __shfl_xor_sync(0xffffffffu, word, m);
      const int64_t vrow = (page * H + h) * p.P + g * 32 + t;
      if ((lane % LPW) == 0) p.v_codes[vrow * (D * BITS / 32) + (lane * E * BITS) / 32] = int32_t(word);
      if ((lane % LPG) == 0) {
        p.v_scale[vrow * (D / 32) + lane / LPG] = vq.hs;
        p.v_zero[vrow * (D / 32) + lane / LPG] = vq.hz;
      }
    }
    __syncwarp();
    // ---- K codes: per channel over the group's 32 tokens, `BITS` words per channel
    Quant kq[E];
#pragma unroll
    for (int i = 0; i < E; ++i) kq[i] = make_quant<BITS>(lo[i], hi[i]);
    uint32_t words[E][BITS];
#pragma unroll
    for (int i = 0; i < E; ++i)
#pragma unroll
      for (int w = 0; w < BITS; ++w) words[i][w] = 0u;
#pragma unroll 4
    for (int t = 0; t < 32; ++t) {
#pragma unroll
      for (int i = 0; i < E; ++i) {
        const uint32_t c = code_of<BITS>(tile[t * D + lane * E + i], kq[i]);
#pragma unroll
        for (int w = 0; w < BITS; ++w)
          if (t / CPW == w) words[i][w] |= c << (BITS * (t % CPW));
      }
    }
    const int64_t kbase = ((page * H + h) * G + g) * D + lane * E;
#pragma unroll
    for (int i = 0; i < E; ++i) {
#pragma unroll
      for (int w = 0; w < BITS; ++w) p.k_codes[(kbase + i) * BITS + w] = int32_t(words[i][w]);
      p.k_scale[kbase + i] = kq[i].hs;
      p.k_zero[kbase + i] = kq[i].hz;
    }
    __syncwarp();
  }
}

template <typename T, int D, int BITS>
void launch_store_t(const StoreParams& p, cudaStream_t stream) {
  // token norms, the fp32 key tiles, and the raw K/V rows of each warp's head
  const size_t smem = (32 + kStoreWarps * 32 * D) * sizeof(float) + kStoreWarps * 2 * 32 * D * sizeof(T);
  auto kern = store_kernel<T, D, BITS>;
  static const bool smem_set = (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)), true);
  (void)smem_set;
  const dim3 grid(p.N * (p.P / 32), (p.H + kStoreWarps - 1) / kStoreWarps);
  if (grid.x > 0) kern<<<grid, kStoreWarps * 32, smem, stream>>>(p);
}

}  // namespace

void launch_store(const StoreParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream) {
#define OSCAR_STORE_CASE(T, DD, BB) \
  if (head_dim == DD && bits == BB) return launch_store_t<T, DD, BB>(p, stream);
  if (bf16) {
    OSCAR_STORE_CASE(__nv_bfloat16, 64, 2) OSCAR_STORE_CASE(__nv_bfloat16, 64, 4)
    OSCAR_STORE_CASE(__nv_bfloat16, 128, 2) OSCAR_STORE_CASE(__nv_bfloat16, 128, 4)
  } else {
    OSCAR_STORE_CASE(__half, 64, 2) OSCAR_STORE_CASE(__half, 64, 4)
    OSCAR_STORE_CASE(__half, 128, 2) OSCAR_STORE_CASE(__half, 128, 4)
  }
#undef OSCAR_STORE_CASE
}

}  // namespace oscar
