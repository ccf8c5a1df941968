// Paged split-KV decode attention over OScaR packed pages (+ the request's raw partial last page).
//
// One CTA = (query, split, KV head, chunk of <= 8 query heads). A split is a run of the query's
// packed pages, derived on the device from its page count (split_range); the residual (raw partial
// page) is folded into its last split. Pages stream
// into shared memory with sm_90 bulk copies (sm_80-89: 16-byte cp.async; 7 contiguous runs per page,
// one per layout field) in a
// 2-deep ring of 256-token stages; each of the 4 warps takes two 32-token chunks (= two K groups) of
// a stage (both QK products, one softmax step over their 64 tokens, both PV products: independent
// MMA chains for the scheduler and half the reductions per token) and keeps its own online-softmax
// state; the warps merge at the end, and split requests are merged by a small combine kernel.
//
// Tensor cores, dequantizing straight into MMA fragments:
//   S^T = K Q'^T   (A = dequantized K, rows = tokens; B = rotated, max-normalized fp16 queries)
//   O^T = V^T P^T  (A = dequantized V, rows = channels; B = P, S^T's accumulators transposed
//                   in registers by movmatrix)
// Token order inside a chunk is permuted so that each thread's fragments come from few whole
// words: row r of m-tile mt is token 4*(r%8) + 2*mt + r/8; the PV k-index follows (see below).
#include <cuda_runtime.h>
#include <math.h>

#include "common.cuh"
#include "kernels.h"
#include "query.cuh"

namespace oscar {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kWarps = 4;

template <int D, int BITS>
struct Geo {
  // One stage = 256 tokens of one KV head (8 K groups), fields in layout order.
  static constexpr int KC_B = 8 * D * BITS * 4;
  static constexpr int KS_B = 8 * D * 2;
  static constexpr int VC_B = 256 * D * BITS / 8;
  static constexpr int VS_B = 256 * (D / 32) * 2;
  static constexpr int KN_B = 256 * 4;
  static constexpr int OFF_KS = KC_B;
  static constexpr int OFF_KZ = OFF_KS + KS_B;
  static constexpr int OFF_VC = OFF_KZ + KS_B;
  static constexpr int OFF_VS = OFF_VC + VC_B;
  static constexpr int OFF_VZ = OFF_VS + VS_B;
  static constexpr int OFF_KN = OFF_VZ + VS_B;
  static constexpr int STAGE_B = OFF_KN + KN_B;
  static constexpr int STAGES = 2;
  static constexpr int Q_OFF = STAGES * STAGE_B;   // fp16 q' [8][D]
  static constexpr int QR_OFF = Q_OFF + 8 * D * 2;  // raw q [8][D] (model dtype)
  static constexpr int QS_OFF = QR_OFF + 8 * D * 2; // fp32 logit scale per head [8]
  static constexpr int BAR_OFF = QS_OFF + 32;
  static constexpr int SMEM = BAR_OFF + 2 * STAGES * 8;  // full + empty barrier per slot
  static constexpr int MIN_BLOCKS = BITS == 2 ? 4 : 2;
  static_assert(kWarps * 8 * D * 4 + 2 * kWarps * 8 * 4 <= STAGES * STAGE_B, "merge scratch must fit in the ring");
};

// Pages [first, end) of split i of a query with n_pages packed pages, and how many splits it uses:
// k = min(splits, ceil(units / kMinSplitStages)) splits of whole 128-token units (half a stage), evenly sized,
// empty trailing splits dropped. Twin: wrapper.split_schedule.
struct SplitRange {
  int first, end, count;
};
__device__ __forceinline__ SplitRange split_range(int n_pages, int P, int splits, int i) {
  const int pps = 128 / P;
  const int stages = (n_pages + pps - 1) / pps;
  int k = 1, sps = 0;
  if (stages > 0) {
    k = min(splits, (stages + kMinSplitStages - 1) / kMinSplitStages);
    sps = (stages + k - 1) / k;
    k = (stages + sps - 1) / sps;
  }
  return {min(n_pages, i * sps * pps), min(n_pages, (i + 1) * sps * pps), k};
}

// Online softmax over one chunk's S^T: S[mt] = {(t0, h0), (t0, h1), (t1, h0), (t1, h1)} with tokens
// t0 = 4*gid + 2*mt, t1 = t0 + 1 and heads h0 = 2*tig, h1 = 2*tig + 1. Leaves exp2 weights in S and
// rescales O^T (whose columns are the same two heads, so no exchange is needed).
struct SoftState {
  float m0, m1, l0, l1;
};

template <int D, int NT = 2>
__device__ __forceinline__ void softmax_step(float (&S)[NT][4], SoftState& st, float (&O)[D / 16][4]) {
  float mx0 = fmaxf(S[0][0], S[0][2]), mx1 = fmaxf(S[0][1], S[0][3]);
#pragma unroll
  for (int mt = 1; mt < NT; ++mt) {
    mx0 = fmaxf(mx0, fmaxf(S[mt][0], S[mt][2]));
    mx1 = fmaxf(mx1, fmaxf(S[mt][1], S[mt][3]));
  }
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
  const float n0 = fmaxf(st.m0, mx0), n1 = fmaxf(st.m1, mx1);
  const float a0 = exp2f(st.m0 - n0), a1 = exp2f(st.m1 - n1);
  float s0 = 0.f, s1 = 0.f;
#pragma unroll
  for (int mt = 0; mt < NT; ++mt) {
    S[mt][0] = exp2f(S[mt][0] - n0);
    S[mt][1] = exp2f(S[mt][1] - n1);
    S[mt][2] = exp2f(S[mt][2] - n0);
    S[mt][3] = exp2f(S[mt][3] - n1);
    s0 += S[mt][0] + S[mt][2];
    s1 += S[mt][1] + S[mt][3];
  }
  st.l0 = st.l0 * a0 + s0;
  st.l1 = st.l1 * a1 + s1;
  st.m0 = n0;
  st.m1 = n1;
  if (!__all_sync(0xffffffffu, a0 == 1.f && a1 == 1.f)) {  // the running max rarely moves late on
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      O[mt][0] *= a0;
      O[mt][1] *= a1;
      O[mt][2] *= a0;
      O[mt][3] *= a1;
    }
  }
}

// P^T fragments of PV k-step kk from S^T m-tile kk: the two 8x8 halves, transposed.
template <typename T>
__device__ __forceinline__ void p_frags(const float (&S)[2][4], int kk, uint32_t& pb0, uint32_t& pb1) {
  pb0 = movmatrix_trans(DT<T>::pack(S[kk][0], S[kk][1]));
  pb1 = movmatrix_trans(DT<T>::pack(S[kk][2], S[kk][3]));
}

// K fields of packed 32-token chunk c (= one K group) of a shared-memory stage.
template <int D, int BITS>
struct KChunk {
  const uint32_t* codes;  // [D][BITS] words: channel d's 32 codes
  const __half* scale;    // [D] per-channel
  const __half* zero;     // [D]
  const float* norm;      // [32] token norms
  __device__ __forceinline__ KChunk(const unsigned char* stage, int c)
      : codes(reinterpret_cast<const uint32_t*>(stage) + c * D * BITS),
        scale(reinterpret_cast<const __half*>(stage + Geo<D, BITS>::OFF_KS) + c * D),
        zero(reinterpret_cast<const __half*>(stage + Geo<D, BITS>::OFF_KZ) + c * D),
        norm(reinterpret_cast<const float*>(stage + Geo<D, BITS>::OFF_KN) + c * 32) {}
};

// 4-bit logits by widening each code with its channel's scale and zero (one HFMA2 per pair): at
// 4 bits the folded form below measured slower (its extra zero MMA and shifts outweigh the HFMA2s).
template <int D, int BITS>
__device__ __forceinline__ void qk_widened(const unsigned char* stage, int c, const uint2 (&qa)[D / 16], float qsc0,
                                         float qsc1, float (&S)[2][4], int gid, int tig) {
  const KChunk<D, BITS> k(stage, c);

  // ---- S^T = K Q'^T. Thread (gid, tig) supplies A for tokens 4*gid + j (j = 2*mt + row half) and
  // channels 16*kt + 4*tig + {0,1 | 2,3}: its 4 tokens sit in one byte (2-bit) / one half-word
  // (4-bit) of a channel's word; one PRMT pairs two channels' bytes, then each token is a shift +
  // LOP3 + HFMA2 away.
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) S[mt][0] = S[mt][1] = S[mt][2] = S[mt][3] = 0.f;
  const int wi = (gid * BITS) >> 3;
  const uint32_t sel = (BITS == 2) ? (((gid & 3) << 4) | ((4 + (gid & 3)) << 12)) : ((gid & 1) ? 0x7632u : 0x5410u);
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) {
    const int d0 = 16 * kt + 4 * tig;
    const uint2 s4 = *reinterpret_cast<const uint2*>(k.scale + d0);
    const uint2 z4 = *reinterpret_cast<const uint2*>(k.zero + d0);
    uint32_t m01, z01, m23, z23;
    scale_pair<BITS>(s4.x, z4.x, m01, z01);
    scale_pair<BITS>(s4.y, z4.y, m23, z23);
    const uint32_t w0 = k.codes[(d0 + 0) * BITS + wi], w1 = k.codes[(d0 + 1) * BITS + wi];
    const uint32_t w2 = k.codes[(d0 + 2) * BITS + wi], w3 = k.codes[(d0 + 3) * BITS + wi];
    const uint32_t r01 = prmt(w0, w1, sel), r23 = prmt(w2, w3, sel);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int q0 = (BITS == 2) ? 8 + 2 * (2 * mt) : 4 * (2 * mt);
      const int q1 = (BITS == 2) ? 8 + 2 * (2 * mt + 1) : 4 * (2 * mt + 1);
      mma_full<__half>(S[mt], dq_pair<BITS>(r01, q0, m01, z01), dq_pair<BITS>(r01, q1, m01, z01),
                       dq_pair<BITS>(r23, q0, m23, z23), dq_pair<BITS>(r23, q1, m23, z23), qa[kt].x, qa[kt].y);
    }
  }
  // logits: S[mt][0..1] is token 4*gid + 2*mt, S[mt][2..3] the next one; times the token norm.
  const float4 nv = *reinterpret_cast<const float4*>(k.norm + 4 * gid);
  const float nn[4] = {nv.x, nv.y, nv.z, nv.w};
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    S[mt][0] *= nn[2 * mt] * qsc0;
    S[mt][1] *= nn[2 * mt] * qsc1;
    S[mt][2] *= nn[2 * mt + 1] * qsc0;
    S[mt][3] *= nn[2 * mt + 1] * qsc1;
  }
}

// Logits S^T (log2 units) of packed 32-token chunk c (= one K group) of a shared-memory stage.
// K's per-channel scale and zero come off the per-element path: with k = s*c + z,
//   q.k = (q*s).c + q.z,
// so the MMA multiplies the raw codes by q*s (two HMUL2 per 16 channels, once per group) and one more
// MMA of the zeros against q adds q.z. A code is used where it lies: masked into the low mantissa
// bits of an fp16 with exponent 0, it is the subnormal c * 2^(q-24), exact, with no offset to remove;
// 2^(24-q) depends only on the token's row in the fragment, so it is one FFMA on the logit.
template <int D, int BITS>
__device__ __forceinline__ void qk_folded(const unsigned char* stage, int c, const uint2 (&qa)[D / 16], float qsc0,
                                          float qsc1, float (&S)[2][4], int gid, int tig) {
  static_assert(BITS == 2, "4-bit logits take qk_widened");
  const KChunk<D, BITS> k(stage, c);

  // ---- S^T = K Q'^T. Thread (gid, tig) supplies A for tokens 4*gid + j (j = 2*mt + row half) and
  // channels 16*kt + 4*tig + {0,1 | 2,3}: its 4 tokens sit in one byte of a channel's word; one PRMT
  // puts two channels' bytes in the low bytes of the two halves, then each token's pair is one LOP3.
  float Z[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) S[mt][0] = S[mt][1] = S[mt][2] = S[mt][3] = 0.f;
  const int wi = (gid * BITS) >> 3;
  const uint32_t sel = uint32_t(gid & 3) * 0x0011u + uint32_t(4 + (gid & 3)) * 0x1100u;
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) {
    const int d0 = 16 * kt + 4 * tig;
    const uint2 s4 = *reinterpret_cast<const uint2*>(k.scale + d0);
    const uint2 z4 = *reinterpret_cast<const uint2*>(k.zero + d0);
    const uint32_t qs0 = hmul2_u32(qa[kt].x, s4.x), qs1 = hmul2_u32(qa[kt].y, s4.y);
    const uint32_t w0 = k.codes[(d0 + 0) * BITS + wi], w1 = k.codes[(d0 + 1) * BITS + wi];
    const uint32_t w2 = k.codes[(d0 + 2) * BITS + wi], w3 = k.codes[(d0 + 3) * BITS + wi];
    const uint32_t r01 = prmt(w0, w1, sel), r23 = prmt(w2, w3, sel);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int q0 = 4 * mt, q1 = 4 * mt + 2;  // token j's code sits at bit 2j of the byte
      mma_full<__half>(S[mt], code_pair<BITS>(r01, q0), code_pair<BITS>(r01, q1), code_pair<BITS>(r23, q0),
                       code_pair<BITS>(r23, q1), qs0, qs1);
    }
    mma_full<__half>(Z, z4.x, z4.x, z4.y, z4.y, qa[kt].x, qa[kt].y);
  }
  // logits: S[mt][0..1] is token 4*gid + 2*mt (code position e0), S[mt][2..3] the next one (e1);
  // undo the subnormal's 2^(q-24), add q.z, times the token norm.
  const float4 nv = *reinterpret_cast<const float4*>(k.norm + 4 * gid);
  const float nn[4] = {nv.x, nv.y, nv.z, nv.w};
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const float e0 = exp2f(24 - 4 * mt), e1 = exp2f(24 - (4 * mt + 2));
    S[mt][0] = fmaf(S[mt][0], e0, Z[0]) * (nn[2 * mt] * qsc0);
    S[mt][1] = fmaf(S[mt][1], e0, Z[1]) * (nn[2 * mt] * qsc1);
    S[mt][2] = fmaf(S[mt][2], e1, Z[0]) * (nn[2 * mt + 1] * qsc0);
    S[mt][3] = fmaf(S[mt][3], e1, Z[1]) * (nn[2 * mt + 1] * qsc1);
  }
}

template <int D, int BITS>
__device__ __forceinline__ void qk_chunk(const unsigned char* stage, int c, const uint2 (&qa)[D / 16], float qsc0,
                                         float qsc1, float (&S)[2][4], int gid, int tig) {
  if constexpr (BITS == 2) qk_folded<D, BITS>(stage, c, qa, qsc0, qsc1, S, gid, tig);
  else qk_widened<D, BITS>(stage, c, qa, qsc0, qsc1, S, gid, tig);
}

// O^T += V^T P^T for packed chunk c, P = the exp2 weights softmax_step left in S.
template <int D, int BITS>
__device__ __forceinline__ void pv_chunk(const unsigned char* stage, int c, const float (&S)[2][4],
                                         float (&O)[D / 16][4], int gid, int tig) {
  using G = Geo<D, BITS>;
  const unsigned char* st_ = stage;
  const uint32_t* vc = reinterpret_cast<const uint32_t*>(st_ + G::OFF_VC) + c * 32 * (D * BITS / 32);
  const __half* vsc = reinterpret_cast<const __half*>(st_ + G::OFF_VS) + c * 32 * (D / 32);
  const __half* vzr = reinterpret_cast<const __half*>(st_ + G::OFF_VZ) + c * 32 * (D / 32);

  // ---- O^T += V^T P^T. PV k-step kk, k-index 2*tig + {0,1} = tokens 8*tig + 2*kk + {0, 4},
  // 2*tig + 8 + {0,1} = tokens 8*tig + 2*kk + 1 + {0, 4}. Thread gid owns channels
  // (D/8)*gid .. +D/8 (rows gid / gid+8 of m-tile mt = its channels 2*mt / 2*mt+1).
  constexpr int TB = D / 8 * BITS;          // code bits per token owned by this thread: 16, 32, 64
  constexpr int NWT = TB >= 32 ? TB / 32 : 1;
  constexpr int WPT = D * BITS / 32;        // words per token
  constexpr int NH = TB / 16, CPH = 16 / BITS;
  const int bitoff = (D / 8) * gid * BITS;
  const int woff = bitoff >> 5, vshift = bitoff & 31;
  uint32_t vw[8][NWT];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int u = 0; u < NWT; ++u) {
      vw[i][u] = vc[(8 * tig + i) * WPT + woff + u];
      if (TB == 16) vw[i][u] >>= vshift;
    }
  const int cg = (D / 8 * gid) >> 5;
  __half sv[8], zv[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    sv[i] = vsc[(8 * tig + i) * (D / 32) + cg];
    zv[i] = vzr[(8 * tig + i) * (D / 32) + cg];
  }
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    uint32_t pb0, pb1;
    p_frags<__half>(S, kk, pb0, pb1);
    uint32_t mA, zA, mB, zB;
    scale_pair<BITS>(pack_h2(sv[2 * kk], sv[2 * kk + 4]), pack_h2(zv[2 * kk], zv[2 * kk + 4]), mA, zA);
    scale_pair<BITS>(pack_h2(sv[2 * kk + 1], sv[2 * kk + 5]), pack_h2(zv[2 * kk + 1], zv[2 * kk + 5]), mB, zB);
    uint32_t X0[D / 8], X1[D / 8];
#pragma unroll
    for (int hh = 0; hh < NH; ++hh) {
      const uint32_t hsel = (hh & 1) ? 0x7632u : 0x5410u;
      const uint32_t r0 = prmt(vw[2 * kk][hh >> 1], vw[2 * kk + 4][hh >> 1], hsel);
      const uint32_t r1 = prmt(vw[2 * kk + 1][hh >> 1], vw[2 * kk + 5][hh >> 1], hsel);
#pragma unroll
      for (int cc = 0; cc < CPH; ++cc) {
        X0[hh * CPH + cc] = dq_pair<BITS>(r0, BITS * cc, mA, zA);
        X1[hh * CPH + cc] = dq_pair<BITS>(r1, BITS * cc, mB, zB);
      }
    }
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt)
      mma_full<__half>(O[mt], X0[2 * mt], X0[2 * mt + 1], X1[2 * mt], X1[2 * mt + 1], pb0, pb1);
  }
}

// Two packed chunks c, c+1 of one warp: both QK products, one softmax step over their 64 tokens
// (independent MMA chains for the scheduler, half the reductions per token), both PV products.
template <int D, int BITS>
__device__ __forceinline__ void packed_pair(const unsigned char* stage, int c, bool second, const uint2 (&qa)[D / 16],
                                            float qsc0, float qsc1, float (&O)[D / 16][4], SoftState& st, int gid,
                                            int tig) {
  float S[4][4];
  float (&S0)[2][4] = *reinterpret_cast<float(*)[2][4]>(&S[0][0]);
  float (&S1)[2][4] = *reinterpret_cast<float(*)[2][4]>(&S[2][0]);
  qk_chunk<D, BITS>(stage, c, qa, qsc0, qsc1, S0, gid, tig);
  if (second) {
    qk_chunk<D, BITS>(stage, c + 1, qa, qsc0, qsc1, S1, gid, tig);
  } else {
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) S1[mt][0] = S1[mt][1] = S1[mt][2] = S1[mt][3] = -INFINITY;
  }
  softmax_step<D, 4>(S, st, O);
  pv_chunk<D, BITS>(stage, c, S0, O, gid, tig);
  if (second) pv_chunk<D, BITS>(stage, c + 1, S1, O, gid, tig);
}

// The raw residual: chunk w of the request's partial page, in the model dtype (exact products).
template <typename T, int D>
__device__ __forceinline__ void residual_chunk(const DecodeParams& p, int64_t row, int h, int rl, int w,
                                               const T* qr_s, float (&O)[D / 16][4], SoftState& st, int gid,
                                               int tig) {
  const T* rk = static_cast<const T*>(p.res_k);
  const T* rv = static_cast<const T*>(p.res_v);
  const int64_t tstride = int64_t(p.H) * D;
  const T* kbase = rk + (row * p.P) * tstride + int64_t(h) * D;
  const T* vbase = rv + (row * p.P) * tstride + int64_t(h) * D;
  float S[2][4];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) S[mt][0] = S[mt][1] = S[mt][2] = S[mt][3] = 0.f;
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) {
    const int d0 = 16 * kt + 4 * tig;
    const uint2 qv = *reinterpret_cast<const uint2*>(qr_s + gid * D + d0);
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const int t0 = 32 * w + 4 * gid + 2 * mt;
      const uint2 k0 = t0 < rl ? *reinterpret_cast<const uint2*>(kbase + t0 * tstride + d0) : make_uint2(0u, 0u);
      const uint2 k1 = t0 + 1 < rl ? *reinterpret_cast<const uint2*>(kbase + (t0 + 1) * tstride + d0)
                                   : make_uint2(0u, 0u);
      mma_full<T>(S[mt], k0.x, k1.x, k0.y, k1.y, qv.x, qv.y);
    }
  }
  const float sc = p.sm_scale * kLog2e;
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
    const int t0 = 32 * w + 4 * gid + 2 * mt;
    S[mt][0] = t0 < rl ? S[mt][0] * sc : -INFINITY;
    S[mt][1] = t0 < rl ? S[mt][1] * sc : -INFINITY;
    S[mt][2] = t0 + 1 < rl ? S[mt][2] * sc : -INFINITY;
    S[mt][3] = t0 + 1 < rl ? S[mt][3] * sc : -INFINITY;
  }
  softmax_step<D>(S, st, O);
  constexpr int NP = D / 16;  // u32 channel pairs owned per token
  uint32_t vr[8][NP];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int t = 32 * w + 8 * tig + i;
    const uint32_t* src = reinterpret_cast<const uint32_t*>(vbase + t * tstride + (D / 8) * gid);
#pragma unroll
    for (int u = 0; u < NP; u += 4) {
      const uint4 x = t < rl ? *reinterpret_cast<const uint4*>(src + u) : make_uint4(0u, 0u, 0u, 0u);
      vr[i][u] = x.x;
      if (u + 1 < NP) vr[i][u + 1] = x.y;
      if (u + 2 < NP) vr[i][u + 2] = x.z;
      if (u + 3 < NP) vr[i][u + 3] = x.w;
    }
  }
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    uint32_t pb0, pb1;
    p_frags<T>(S, kk, pb0, pb1);
#pragma unroll
    for (int mt = 0; mt < D / 16; ++mt) {
      const uint32_t a0 = prmt(vr[2 * kk][mt], vr[2 * kk + 4][mt], 0x5410u);
      const uint32_t a1 = prmt(vr[2 * kk][mt], vr[2 * kk + 4][mt], 0x7632u);
      const uint32_t a2 = prmt(vr[2 * kk + 1][mt], vr[2 * kk + 5][mt], 0x5410u);
      const uint32_t a3 = prmt(vr[2 * kk + 1][mt], vr[2 * kk + 5][mt], 0x7632u);
      mma_full<T>(O[mt], a0, a1, a2, a3, pb0, pb1);
    }
  }
}

template <typename T, int D, int BITS>
__global__ void __launch_bounds__(kWarps * 32, Geo<D, BITS>::MIN_BLOCKS) decode_kernel(const DecodeParams p) {
  using G = Geo<D, BITS>;
  constexpr int E = D / 32;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
  // Split-major grid: every query's first splits come before anyone's later ones, so the CTAs with
  // work are dispatched (and spread over the SMs) first; unused splits are a tail that exits at once.
  const int b = blockIdx.y % p.B, split = blockIdx.y / p.B;
  const int h = blockIdx.x / p.q_chunks, qc = blockIdx.x % p.q_chunks;
  const int n_pages = p.num_pages[b];
  const int64_t prow = p.page_rows ? p.page_rows[b] : int64_t(b);  // loaded alongside n_pages
  const SplitRange sr = split_range(n_pages, p.P, p.splits, split);
  if (split >= sr.count) return;  // this query needs fewer splits (uniform over the CTA)
  const int pg0 = sr.first, pg1 = sr.end;
  const bool last = split == sr.count - 1, sole = sr.count == 1;
  const int grp = p.Hq / p.H;
  const int hq0 = h * grp + qc * 8;
  const int NQ = min(8, grp - qc * 8);
  const int P = p.P, PPS = 256 / P;
  const int nstages = (pg1 - pg0 + PPS - 1) / PPS;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + G::BAR_OFF);
  uint64_t* empty = bars + G::STAGES;
  __half* q_s = reinterpret_cast<__half*>(smem + G::Q_OFF);
  T* qr_s = reinterpret_cast<T*>(smem + G::QR_OFF);
  float* qsc_s = reinterpret_cast<float*>(smem + G::QS_OFF);

  const uint32_t kc_pg = (P / 32) * D * BITS * 4, ks_pg = (P / 32) * D * 2;
  const uint32_t vc_pg = P * D * BITS / 8, vs_pg = P * (D / 32) * 2, kn_pg = P * 4;
  const uint32_t page_bytes = kc_pg + 2 * ks_pg + vc_pg + 2 * vs_pg + kn_pg;
  const int32_t* ptab = p.page_table + prow * p.page_row_stride;

  // Warp 0 issues a stage, 7 runs per page (one per layout field). sm_90: lane i bulk-copies page i;
  // sm_80-89: the warp streams each run in 16-byte cp.async pieces and every lane arrives on the
  // stage's barrier (count 32) once its own pieces have landed.
  auto issue = [&](int s, int pid) {
    const int first = pg0 + s * PPS;
    const int np = min(PPS, pg1 - first);
    unsigned char* base = smem + (s % G::STAGES) * G::STAGE_B;
    uint64_t* bar = bars + (s % G::STAGES);
#if OSCAR_SM90
    if (lane == 0) mbar_expect_tx(bar, np * page_bytes);
    __syncwarp();
    if (lane < np) {
      const int64_t ph = int64_t(pid) * p.H + h;
      bulk_g2s(base + lane * kc_pg, p.k_codes + ph * (kc_pg / 4), kc_pg, bar);
      bulk_g2s(base + G::OFF_KS + lane * ks_pg, p.k_scale + ph * (ks_pg / 2), ks_pg, bar);
      bulk_g2s(base + G::OFF_KZ + lane * ks_pg, p.k_zero + ph * (ks_pg / 2), ks_pg, bar);
      bulk_g2s(base + G::OFF_VC + lane * vc_pg, p.v_codes + ph * (vc_pg / 4), vc_pg, bar);
      bulk_g2s(base + G::OFF_VS + lane * vs_pg, p.v_scale + ph * (vs_pg / 2), vs_pg, bar);
      bulk_g2s(base + G::OFF_VZ + lane * vs_pg, p.v_zero + ph * (vs_pg / 2), vs_pg, bar);
      bulk_g2s(base + G::OFF_KN + lane * kn_pg, p.k_norm + int64_t(pid) * P, kn_pg, bar);
    }
#else
    (void)page_bytes;
    for (int i = 0; i < np; ++i) {
      const int64_t pg = __shfl_sync(0xffffffffu, pid, i);
      const int64_t ph = pg * p.H + h;
      const unsigned char* src[7] = {
          reinterpret_cast<const unsigned char*>(p.k_codes + ph * (kc_pg / 4)),
          reinterpret_cast<const unsigned char*>(p.k_scale + ph * (ks_pg / 2)),
          reinterpret_cast<const unsigned char*>(p.k_zero + ph * (ks_pg / 2)),
          reinterpret_cast<const unsigned char*>(p.v_codes + ph * (vc_pg / 4)),
          reinterpret_cast<const unsigned char*>(p.v_scale + ph * (vs_pg / 2)),
          reinterpret_cast<const unsigned char*>(p.v_zero + ph * (vs_pg / 2)),
          reinterpret_cast<const unsigned char*>(p.k_norm + pg * P)};
      unsigned char* dst[7] = {base + i * kc_pg,          base + G::OFF_KS + i * ks_pg, base + G::OFF_KZ + i * ks_pg,
                               base + G::OFF_VC + i * vc_pg, base + G::OFF_VS + i * vs_pg, base + G::OFF_VZ + i * vs_pg,
                               base + G::OFF_KN + i * kn_pg};
      const uint32_t len[7] = {kc_pg, ks_pg, ks_pg, vc_pg, vs_pg, vs_pg, kn_pg};
#pragma unroll
      for (int f = 0; f < 7; ++f)
        for (uint32_t off = 16 * lane; off < len[f]; off += 16 * 32) cp16(dst[f] + off, src[f] + off);
    }
    cp_arrive(bar);
#endif
  };
  auto load_pid = [&](int s) -> int {
    const int pg = pg0 + s * PPS + lane;
    return (s < nstages && lane < PPS && pg < pg1) ? ptab[pg * p.page_col_stride] >> p.page_shift : 0;
  };

  if (tid == 0) {
#pragma unroll
    for (int i = 0; i < G::STAGES; ++i) {
      mbar_init(bars + i, OSCAR_SM90 ? 1 : 32);  // expect_tx / 32 lanes' cp.async
      mbar_init(empty + i, kWarps);              // one arrival per consumer warp
    }
    mbar_fence_init();
  }
  __syncthreads();
  int pid_next = 0;
  if (warp == 0) {
    for (int s = 0; s < G::STAGES && s < nstages; ++s) issue(s, load_pid(s));
    pid_next = load_pid(G::STAGES);
  }

  // ---- queries: rotate (fp32 Hadamard), scale each head by its max |q| into fp16 for the packed
  // MMA; keep the raw model-dtype copy for the residual.
  for (int lh = warp; lh < 8; lh += kWarps) {
    const T* qp = lh < NQ ? static_cast<const T*>(p.q) + (int64_t(b) * p.Hq + hq0 + lh) * D : nullptr;
    const float mx = prepare_query<T, E>(qp, p.rotate, qr_s + lh * D, q_s + lh * D);
    if (lane == 0) qsc_s[lh] = mx * p.sm_scale * kLog2e;
  }
  __syncthreads();
  uint2 qa[D / 16];
#pragma unroll
  for (int kt = 0; kt < D / 16; ++kt) qa[kt] = *reinterpret_cast<const uint2*>(q_s + gid * D + 16 * kt + 4 * tig);
  const float qsc0 = qsc_s[2 * tig], qsc1 = qsc_s[2 * tig + 1];

  float O[D / 16][4];
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) O[mt][0] = O[mt][1] = O[mt][2] = O[mt][3] = 0.f;
  SoftState st{-INFINITY, -INFINITY, 0.f, 0.f};

  for (int s = 0; s < nstages; ++s) {
    const int slot = s % G::STAGES;
    mbar_wait(bars + slot, (s / G::STAGES) & 1);
    const int np = min(PPS, pg1 - (pg0 + s * PPS));
    if (warp * 64 < np * P)
      packed_pair<D, BITS>(smem + slot * G::STAGE_B, 2 * warp, warp * 64 + 32 < np * P, qa, qsc0, qsc1, O, st, gid, tig);
    // Each warp frees the slot on its own "empty" barrier (no CTA barrier): a warp that is done moves
    // on to the next resident stage; only the producer waits for all four before refilling the slot.
    __syncwarp();
    if (lane == 0) mbar_arrive(empty + slot);
    if (warp == 0 && s + G::STAGES < nstages) {
      mbar_wait(empty + slot, (s / G::STAGES) & 1);
      issue(s + G::STAGES, pid_next);
      pid_next = load_pid(s + G::STAGES + 1);
    }
  }
  if (last) {
    const int rl = p.res_len[b];
    if (warp * 32 < rl) residual_chunk<T, D>(p, p.res_rows[b], h, rl, warp, qr_s, O, st, gid, tig);
  }

  // ---- merge the 4 warps' states (scratch reuses the stage ring: every copy has landed).
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    st.l0 += __shfl_xor_sync(0xffffffffu, st.l0, off);
    st.l1 += __shfl_xor_sync(0xffffffffu, st.l1, off);
  }
  __syncthreads();
  float* red_o = reinterpret_cast<float*>(smem);
  float* red_m = red_o + kWarps * 8 * D;
  float* red_l = red_m + kWarps * 8;
  if (gid == 0) {
    red_m[warp * 8 + 2 * tig] = st.m0;
    red_m[warp * 8 + 2 * tig + 1] = st.m1;
    red_l[warp * 8 + 2 * tig] = st.l0;
    red_l[warp * 8 + 2 * tig + 1] = st.l1;
  }
#pragma unroll
  for (int mt = 0; mt < D / 16; ++mt) {
    const int ch = (D / 8) * gid + 2 * mt;
    red_o[(warp * 8 + 2 * tig) * D + ch] = O[mt][0];
    red_o[(warp * 8 + 2 * tig + 1) * D + ch] = O[mt][1];
    red_o[(warp * 8 + 2 * tig) * D + ch + 1] = O[mt][2];
    red_o[(warp * 8 + 2 * tig + 1) * D + ch + 1] = O[mt][3];
  }
  __syncthreads();
  for (int idx = tid; idx < NQ * D; idx += kWarps * 32) {
    const int hh = idx / D, d = idx % D;
    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, red_m[w * 8 + hh]);
    float L = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float f = exp2f(red_m[w * 8 + hh] - M);
      L += red_l[w * 8 + hh] * f;
      o += red_o[(w * 8 + hh) * D + d] * f;
    }
    o = L > 0.f ? o / L : 0.f;  // nothing visible (no pages, no residual; L is NaN then): 0, lse -inf
    const int64_t hq = hq0 + hh;
    if (sole) {
      static_cast<T*>(p.out)[(int64_t(b) * p.Hq + hq) * D + d] = DT<T>::from_f(o);
      if (p.lse && d == 0) p.lse[int64_t(b) * p.Hq + hq] = L > 0.f ? M + log2f(L) : -INFINITY;
    } else {
      const int64_t item = int64_t(b) * p.splits + split;
      p.part_o[(item * p.Hq + hq) * D + d] = o;
      if (d == 0) p.part_lse[item * p.Hq + hq] = M + log2f(L);
    }
  }
}

// Merge the splits of each query: out = sum_i 2^(lse_i - LSE) o_i.
template <typename T, int D>
__global__ void combine_kernel(const DecodeParams p) {
  const int b = blockIdx.x, hq = blockIdx.y;
  const int n = split_range(p.num_pages[b], p.P, p.splits, 0).count;
  if (n <= 1) return;  // written directly by its only split
  const int64_t i0 = int64_t(b) * p.splits, i1 = i0 + n;
  float M = -INFINITY;
  for (int64_t i = i0; i < i1; ++i) M = fmaxf(M, p.part_lse[int64_t(i) * p.Hq + hq]);
  float L = 0.f;
  for (int64_t i = i0; i < i1; ++i) L += exp2f(p.part_lse[int64_t(i) * p.Hq + hq] - M);
  if (p.lse && threadIdx.x == 0) p.lse[int64_t(b) * p.Hq + hq] = M + log2f(L);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int64_t i = i0; i < i1; ++i)
      o += exp2f(p.part_lse[int64_t(i) * p.Hq + hq] - M) * p.part_o[(int64_t(i) * p.Hq + hq) * D + d];
    static_cast<T*>(p.out)[(int64_t(b) * p.Hq + hq) * D + d] = DT<T>::from_f(o / L);
  }
}

template <typename T, int D, int BITS>
void launch_decode_t(const DecodeParams& p, cudaStream_t stream) {
  using G = Geo<D, BITS>;
  auto kern = decode_kernel<T, D, BITS>;
  // Once per instantiation: keeps the launch path free of extra driver calls (and graph-capture safe).
  static const bool smem_set = (cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, G::SMEM), true);
  (void)smem_set;
  if (p.B == 0) return;
  kern<<<dim3(p.H * p.q_chunks, p.B * p.splits), kWarps * 32, G::SMEM, stream>>>(p);
  if (p.splits > 1) combine_kernel<T, D><<<dim3(p.B, p.Hq), D, 0, stream>>>(p);
}

template <typename T, int D, int BITS>
int blocks_per_sm_t() {
  using G = Geo<D, BITS>;
  auto kern = decode_kernel<T, D, BITS>;
  cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, G::SMEM);
  int n = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kern, kWarps * 32, G::SMEM);
  return n;
}

}  // namespace

#define OSCAR_DISPATCH(FN, ...)                                                              \
  if (bf16) {                                                                                \
    if (head_dim == 64 && bits == 2) return FN<__nv_bfloat16, 64, 2>(__VA_ARGS__);          \
    if (head_dim == 64 && bits == 4) return FN<__nv_bfloat16, 64, 4>(__VA_ARGS__);          \
    if (head_dim == 128 && bits == 2) return FN<__nv_bfloat16, 128, 2>(__VA_ARGS__);        \
    if (head_dim == 128 && bits == 4) return FN<__nv_bfloat16, 128, 4>(__VA_ARGS__);        \
  } else {                                                                                   \
    if (head_dim == 64 && bits == 2) return FN<__half, 64, 2>(__VA_ARGS__);                 \
    if (head_dim == 64 && bits == 4) return FN<__half, 64, 4>(__VA_ARGS__);                 \
    if (head_dim == 128 && bits == 2) return FN<__half, 128, 2>(__VA_ARGS__);               \
    if (head_dim == 128 && bits == 4) return FN<__half, 128, 4>(__VA_ARGS__);               \
  }

void launch_decode(const DecodeParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream) {
  OSCAR_DISPATCH(launch_decode_t, p, stream)
}

int decode_blocks_per_sm(int head_dim, int bits, bool bf16) {
  OSCAR_DISPATCH(blocks_per_sm_t)
  return 0;
}

}  // namespace oscar
