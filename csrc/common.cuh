// Small device helpers shared by the OScaR kernels: dtype traits, tensor-core MMA, code unpacking,
// 16-byte cp.async (sm_80+), mbarriers (sm_80+) and the bulk copies of sm_90.
// OSCAR_SM90: compiling for sm_90 or later (bulk async copies, mbarrier try_wait and expect_tx);
// the sm_80-89 build streams the same bytes by cp.async and spins on mbarrier test_wait.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define OSCAR_SM90 1
#else
#define OSCAR_SM90 0
#endif

namespace oscar {

template <typename T> struct DT;
template <> struct DT<__half> {
  static __device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_f(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};
template <> struct DT<__nv_bfloat16> {
  static __device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_f(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
};

// D = A*B + C for one m16n8k16 tile, fp32 accumulate (S^T = K Q^T and O^T = V^T P^T).
template <typename T>
__device__ __forceinline__ void mma_full(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_full<__half>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_full<__nv_bfloat16>(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Transpose of an 8x8 b16 tile held in the MMA C/A fragment layout (row lane/4, cols 2*(lane%4)+{0,1}).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t sel) {
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// Dequantize a pair of codes into a half2. `r` holds one BITS-bit code at bit q of each 16-bit half
// (q is a compile-time constant once the caller's loop is unrolled). The code is moved to the top
// of an fp16 mantissa with exponent 0 (value 1 + c * 2^-BITS, exact), so
// code*s + z = x * (s * 2^BITS) + (z - s * 2^BITS): one shift, one LOP3, one HFMA2.
template <int BITS>
__device__ __forceinline__ uint32_t dq_pair(uint32_t r, int q, uint32_t m, uint32_t zp) {
  constexpr int P = 10 - BITS;
  constexpr uint32_t mask = ((1u << BITS) - 1u) << P;
  const uint32_t t = (q <= P) ? (r << (P - q)) : (r >> (q - P));
  uint32_t x;  // (t & mask) | exponent in one LOP3 (two immediates would split it in two)
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(x) : "r"(t), "r"(mask | (mask << 16)), "r"(0x3C003C00u));
  __half2 y = __hfma2(*reinterpret_cast<const __half2*>(&x), *reinterpret_cast<const __half2*>(&m),
                      *reinterpret_cast<const __half2*>(&zp));
  return *reinterpret_cast<uint32_t*>(&y);
}

// A pair of codes as fp16 subnormals: `r` holds one BITS-bit code at bit q (< 10) of each 16-bit
// half; masking it alone leaves exponent 0, i.e. the value c * 2^(q-24), exact (tensor cores keep
// fp16 subnormals). The caller undoes 2^(q-24) once on the product, so a code costs one LOP3.
template <int BITS>
__device__ __forceinline__ uint32_t code_pair(uint32_t r, int q) {
  constexpr uint32_t m = (1u << BITS) - 1u;
  return r & ((m << q) | (m << (q + 16)));
}

__device__ __forceinline__ uint32_t hmul2_u32(uint32_t a, uint32_t b) {
  __half2 y = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<uint32_t*>(&y);
}

// (s, z) fp16 pairs -> (m, z') with m = s * 2^BITS (exact) and z' = z - m (one fp16 rounding).
template <int BITS>
__device__ __forceinline__ void scale_pair(uint32_t s, uint32_t z, uint32_t& m, uint32_t& zp) {
  const __half2 f = __float2half2_rn(float(1 << BITS));
  __half2 mm = __hmul2(*reinterpret_cast<const __half2*>(&s), f);
  __half2 zz = __hsub2(*reinterpret_cast<const __half2*>(&z), mm);
  m = *reinterpret_cast<uint32_t*>(&mm);
  zp = *reinterpret_cast<uint32_t*>(&zz);
}

__device__ __forceinline__ uint32_t pack_h2(__half a, __half b) {
  return uint32_t(__half_as_ushort(a)) | (uint32_t(__half_as_ushort(b)) << 16);
}

// ---- cp.async, mbarriers, bulk async copies ----
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared, asynchronous. src-size 0 zero-fills (!valid): pages / keys a tile does
// not have read as zeros (finite, masked).
__device__ __forceinline__ void cp16(void* dst, const void* src, bool valid = true) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// One arrival on `bar` once this thread's earlier cp.async copies have landed (counted in the
// barrier's init count: .noinc).
__device__ __forceinline__ void cp_arrive(uint64_t* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
// Makes the inits visible to the async proxy (bulk copies); before sm_90 the CTA barrier that
// follows the inits is enough.
__device__ __forceinline__ void mbar_fence_init() {
#if OSCAR_SM90
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
#if OSCAR_SM90
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#else
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "WAIT_%=:\n"
      "mbarrier.test_wait.parity.shared.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n"
      "}\n" ::"r"(smem_addr(bar)),
      "r"(parity)
      : "memory");
#endif
}
// One plain arrival (release: this thread's earlier shared-memory reads are ordered before it).
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile(
      "{\n"
      ".reg .b64 st;\n"
      "mbarrier.arrive.shared.b64 st, [%0];\n"
      "}\n" ::"r"(smem_addr(bar))
      : "memory");
}
#if OSCAR_SM90
__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}
#endif

}  // namespace oscar
