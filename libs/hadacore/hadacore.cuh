// Header-only fast Walsh-Hadamard transform for CUDA, fp32, normalized Sylvester order:
// H[i][j] = (-1)^popcount(i & j) / sqrt(n). Symmetric and orthogonal (its own inverse).
//
// One warp transforms one vector of n = 32 * E elements; lane l holds elements [l*E, l*E + E).
// The butterfly stages run h = 1, 2, 4, ... exactly like the torch reference (a + b, a - b per
// pair), so results agree bit for bit in fp32 before the final scaling: stages with h < E stay in
// registers, the rest exchange partners with one shuffle per element.
#pragma once

namespace hadacore {

template <int E>
__device__ __forceinline__ void warp_fwht(float (&x)[E], float scale) {
  static_assert(E >= 1 && (E & (E - 1)) == 0, "elements per lane must be a power of two");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int h = 1; h < E; h <<= 1) {
#pragma unroll
    for (int i = 0; i < E; ++i) {
      if (!(i & h)) {
        const float a = x[i], b = x[i + h];
        x[i] = a + b;
        x[i + h] = a - b;
      }
    }
  }
#pragma unroll
  for (int m = 1; m < 32; m <<= 1) {
    const bool upper = lane & m;  // this lane holds the "b" half of each pair at this stage
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const float o = __shfl_xor_sync(0xffffffffu, x[i], m);
      x[i] = upper ? o - x[i] : x[i] + o;
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i) x[i] *= scale;
}

// 1/sqrt(n) rounded once to fp32, the constant the reference multiplies by.
__host__ __device__ constexpr float inv_sqrt_pow2(int n) {
  return n == 64 ? 0.125f : n == 128 ? 0.08838834764831845f : n == 256 ? 0.0625f : n == 32 ? 0.17677669529663687f : 1.0f;
}

}  // namespace hadacore
