// Query preparation shared by the attention kernels (decode.cu, extend.cu).
#pragma once
#include "common.cuh"
#include "hadacore/hadacore.cuh"

namespace oscar {

// One query vector per warp, lane l holding elements [l*E, l*E + E) (E = head_dim / 32). `src` (null
// for a padding row: zeros) is copied raw to `raw_dst`, for the MMA against raw keys, and rotated
// (fp32 Hadamard, when the method rotates) and divided by its max |q| into fp16 at `dst`, for the MMA
// against packed keys. Returns that max (1 for an all-zero row), which goes back into the logit scale.
template <typename T, int E>
__device__ __forceinline__ float prepare_query(const T* src, bool rotate, T* raw_dst, __half* dst) {
  const int lane = threadIdx.x & 31;
  float x[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const T v = src ? src[lane * E + i] : DT<T>::from_f(0.f);
    raw_dst[lane * E + i] = v;
    x[i] = DT<T>::to_f(v);
  }
  if (rotate) hadacore::warp_fwht<E>(x, hadacore::inv_sqrt_pow2(32 * E));
  float mx = 0.f;
#pragma unroll
  for (int i = 0; i < E; ++i) mx = fmaxf(mx, fabsf(x[i]));
#pragma unroll
  for (int m = 16; m; m >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, m));
  if (!(mx > 0.f) || !isfinite(mx)) mx = 1.f;
  const float inv = 1.f / mx;
#pragma unroll
  for (int i = 0; i < E; ++i) dst[lane * E + i] = __float2half_rn(x[i] * inv);
  return mx;
}

}  // namespace oscar
