// Multi-query (extend / prefill) attention over OScaR packed pages plus raw keys, on tensor cores.
//
// One CTA = (block of query tokens of one request, KV head). Its 64 or 128 MMA rows (16 per warp) are
// (token, query head) pairs of that KV head's GQA group (row r = token r / g, head r % g), so every
// key tile loaded and dequantized serves all of them. A query at position p sees keys [0, qb) through their packed pages and keys
// [qb, p] raw (the step's scratch of raw tokens), where qb = (p / P) * P (page prefill) or
// (prefix / P) * P (chunk prefill): one kernel for both modes, FlashAttention-2 style:
//   packed phase: a 64-token tile's bytes arrive by cp.async in a 2-deep staging ring; all threads
//     dequantize it ONCE into fp16 K^T / V tiles in shared memory; S = Q' K^T and O += P V run on
//     mma.sync m16n8k16 (fp16) with ldmatrix, Q' the rotated queries scaled to [-1, 1] per row
//     (as in decode.cu), the token norm and the row scale applied to S in fp32;
//   raw phase: model-dtype K / V tiles by cp.async (V of tile j loads while S_j computes, K of j+1
//     while P_j V_j does), raw queries, causal by position.
// Output (model dtype) and, on request, lse (base 2), like the decode kernel.
// Key splits (p.splits > 1): a CTA takes one run of its block's key tiles and writes an fp32 partial;
// extend_combine merges them (a chat turn's few query blocks over a long prefix then fill the GPU).
#include <cuda_runtime.h>
#include <math.h>

#include "common.cuh"
#include "kernels.h"
#include "query.cuh"

namespace oscar {
namespace {

constexpr int kTile = 64;  // keys per tile
constexpr float kLog2eX = 1.4426950408889634f;

template <int D, int BITS, int WARPS>
struct XGeo {
  static constexpr int kRows = 16 * WARPS;  // MMA rows per CTA, 16 per warp
  static constexpr int LDQ = D + 8;        // halves per row of Q, raw K, V (+8: conflict-free ldmatrix)
  static constexpr int LDKT = kTile + 8;   // halves per row of the transposed packed K
  static constexpr int KBUF = D * LDKT > kTile * LDQ ? D * LDKT : kTile * LDQ;
  static constexpr int VBUF = kTile * LDQ;
  // one staged packed tile (64 tokens of one KV head), fields in layout order
  static constexpr int KC_B = 2 * D * BITS * 4;
  static constexpr int KS_B = 2 * D * 2;
  static constexpr int VC_B = kTile * D * BITS / 8;
  static constexpr int VS_B = kTile * (D / 32) * 2;
  static constexpr int KN_B = kTile * 4;
  static constexpr int OFF_KS = KC_B;
  static constexpr int OFF_KZ = OFF_KS + KS_B;
  static constexpr int OFF_VC = OFF_KZ + KS_B;
  static constexpr int OFF_VS = OFF_VC + VC_B;
  static constexpr int OFF_VZ = OFF_VS + VS_B;
  static constexpr int OFF_KN = OFF_VZ + VS_B;
  static constexpr int STAGE_B = OFF_KN + KN_B;
  // shared memory map (bytes)
  static constexpr int Q_OFF = 0;                          // fp16 q' [kRows][LDQ]
  static constexpr int QR_OFF = Q_OFF + kRows * LDQ * 2;   // raw q (model dtype) [kRows][LDQ]
  static constexpr int K_OFF = QR_OFF + kRows * LDQ * 2;
  static constexpr int V_OFF = K_OFF + KBUF * 2;
  static constexpr int ST_OFF = V_OFF + VBUF * 2;
  static constexpr int QS_OFF = ST_OFF + 2 * STAGE_B;      // fp32 logit scale per row
  static constexpr int SMEM = QS_OFF + kRows * 4;
};

__device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// One packed word -> its 32/BITS fp16 values in element order (element i at bits BITS*i).
// dq_pair yields (e_i, e_{i+half}) pairs (one per 16-bit half); one PRMT per pair restores order.
template <int BITS>
__device__ __forceinline__ void dq_word(uint32_t w, uint32_t m, uint32_t zp, uint32_t (&o)[16 / BITS]) {
  constexpr int N = 16 / BITS;  // output u32 pairs: 8 (2-bit), 4 (4-bit)
  uint32_t X[N];
#pragma unroll
  for (int i = 0; i < N; ++i) X[i] = dq_pair<BITS>(w, BITS * i, m, zp);
#pragma unroll
  for (int k = 0; k < N / 2; ++k) {
    o[k] = prmt(X[2 * k], X[2 * k + 1], 0x5410u);
    o[N / 2 + k] = prmt(X[2 * k], X[2 * k + 1], 0x7632u);
  }
}

// Online softmax over one 64-key tile: S[nt] = {(r0, c), (r0, c+1), (r1, c), (r1, c+1)},
// c = 8 nt + 2 tig, rows r0 = gid, r1 = gid + 8 of the warp (log2 units). Leaves exp2 weights in S.
template <int D>
__device__ __forceinline__ void online_softmax(float (&S)[8][4], float (&m)[2], float (&l)[2], float (&O)[D / 8][4]) {
  float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    mx[0] = fmaxf(mx[0], fmaxf(S[nt][0], S[nt][1]));
    mx[1] = fmaxf(mx[1], fmaxf(S[nt][2], S[nt][3]));
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
    mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
  }
  float base[2], alpha[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float n = fmaxf(m[i], mx[i]);
    base[i] = n == -INFINITY ? 0.f : n;  // a row with nothing visible yet: weights 0, no NaN
    alpha[i] = exp2f(m[i] - base[i]);
    m[i] = n;
  }
  float s[2] = {0.f, 0.f};
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    S[nt][0] = exp2f(S[nt][0] - base[0]);
    S[nt][1] = exp2f(S[nt][1] - base[0]);
    S[nt][2] = exp2f(S[nt][2] - base[1]);
    S[nt][3] = exp2f(S[nt][3] - base[1]);
    s[0] += S[nt][0] + S[nt][1];
    s[1] += S[nt][2] + S[nt][3];
  }
  l[0] = l[0] * alpha[0] + s[0];
  l[1] = l[1] * alpha[1] + s[1];
  // Once the running maxima settle, alpha is 1 for every row of the warp: skip the (exact) no-op rescale.
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt) {
      O[nt][0] *= alpha[0];
      O[nt][1] *= alpha[0];
      O[nt][2] *= alpha[1];
      O[nt][3] *= alpha[1];
    }
  }
}

// S (16 x 64 per warp) = Q (A fragments) x B, B read from `kb` by ldmatrix: packed K is stored
// transposed [D][LDKT] (.trans), raw K row-major [64][LDQ] (plain).
template <typename MT, int D, bool TRANSPOSED>
__device__ __forceinline__ void qk_tile(const uint32_t (&qf)[D / 16][4], const __half* kb, float (&S)[8][4], int lane) {
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) S[nt][0] = S[nt][1] = S[nt][2] = S[nt][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      uint32_t b[4];
      if (TRANSPOSED) {
        ldsm4_t(b, kb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * (kTile + 8) + (2 * np + (lane >> 4)) * 8);
      } else {
        ldsm4(b, kb + ((2 * np + (lane >> 4)) * 8 + (lane & 7)) * (D + 8) + kk * 16 + ((lane >> 3) & 1) * 8);
      }
      mma_full<MT>(S[2 * np], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], b[0], b[1]);
      mma_full<MT>(S[2 * np + 1], qf[kk][0], qf[kk][1], qf[kk][2], qf[kk][3], b[2], b[3]);
    }
  }
}

// O (16 x D per warp) += P V, P from the softmax weights in S (the C layout is the A layout).
template <typename MT, int D>
__device__ __forceinline__ void pv_tile(const float (&S)[8][4], const __half* vb, float (&O)[D / 8][4], int lane) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const uint32_t a0 = DT<MT>::pack(S[2 * kk][0], S[2 * kk][1]);
    const uint32_t a1 = DT<MT>::pack(S[2 * kk][2], S[2 * kk][3]);
    const uint32_t a2 = DT<MT>::pack(S[2 * kk + 1][0], S[2 * kk + 1][1]);
    const uint32_t a3 = DT<MT>::pack(S[2 * kk + 1][2], S[2 * kk + 1][3]);
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t b[4];
      ldsm4_t(b, vb + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * (D + 8) + (2 * np + (lane >> 4)) * 8);
      mma_full<MT>(O[2 * np], a0, a1, a2, a3, b[0], b[1]);
      mma_full<MT>(O[2 * np + 1], a0, a1, a2, a3, b[2], b[3]);
    }
  }
}

template <int D>
__device__ __forceinline__ void load_q_frags(uint32_t (&qf)[D / 16][4], const __half* qs, int warp, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ldsm4(qf[kk], qs + (warp * 16 + (lane & 15)) * (D + 8) + kk * 16 + (lane >> 4) * 8);
}

// WARPS 8 (128 rows, one CTA per SM) halves the dequantization and the loads per row; WARPS 4 (64
// rows, two CTAs per SM) keeps small batches from leaving SMs idle.
template <typename T, int D, int BITS, int WARPS>
__global__ void __launch_bounds__(WARPS * 32, 8 / WARPS) extend_kernel(const ExtendParams p) {
  using G = XGeo<D, BITS, WARPS>;
  constexpr int LDQ = G::LDQ, LDKT = G::LDKT, kXThreads = WARPS * 32;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, gid = lane >> 2, tig = lane & 3;
  const int item = p.num_blocks - 1 - int(blockIdx.x);  // late (longest causal) blocks first
  const int h = blockIdx.y;

  // ---- which request and token block
  int lo = 0, hi = p.B - 1;
  while (lo < hi) {  // the last request whose first block is <= item (requests with no block skipped)
    const int mid = (lo + hi + 1) >> 1;
    if (p.blk_start[mid] <= item) lo = mid; else hi = mid - 1;
  }
  const int b = lo;
  const int4 info = reinterpret_cast<const int4*>(p.req_info)[2 * b];
  const int q_start = info.x, ext = info.y, prefix = info.z, raw_off = info.w;
  const int row = reinterpret_cast<const int4*>(p.req_info)[2 * b + 1].x;
  const int g = p.Hq / p.H, TB = p.tok_per_blk, P = p.P;
  const int t0 = (item - p.blk_start[b]) * TB;
  const int ntok = min(TB, ext - t0);
  const int base = prefix / P * P;  // position of the request's first raw token in the scratch
  auto qbound = [&](int pos) { return p.chunk ? base : pos / P * P; };
  const int pos_first = prefix + t0, pos_last = prefix + t0 + ntok - 1;
  const int packed_end = qbound(pos_last);  // packed keys [0, packed_end) for the block's last row
  const int raw_lo = qbound(pos_first);     // raw keys [raw_lo, pos_last]
  const int n_ptiles = (packed_end + kTile - 1) / kTile;
  const int n_rtiles = (pos_last - raw_lo) / kTile + 1;
  const int npk = packed_end / P;
  // this CTA's run of the block's key tiles: packed [pj0, pj1), then raw [rj0, rj1)
  int u0 = 0, u1 = n_ptiles + n_rtiles;
  if (p.splits > 1) {
    const int per = (u1 + p.splits - 1) / p.splits;
    u0 = min(u1, int(blockIdx.z) * per);
    u1 = min(u1, u0 + per);
  }
  const int pj0 = min(u0, n_ptiles), pj1 = min(u1, n_ptiles);
  const int rj0 = max(u0 - n_ptiles, 0), rj1 = max(u1 - n_ptiles, 0);

  __half* q_s = reinterpret_cast<__half*>(smem + G::Q_OFF);
  T* qr_s = reinterpret_cast<T*>(smem + G::QR_OFF);
  __half* k_s = reinterpret_cast<__half*>(smem + G::K_OFF);
  __half* v_s = reinterpret_cast<__half*>(smem + G::V_OFF);
  float* qsc_s = reinterpret_cast<float*>(smem + G::QS_OFF);
  const int32_t* r2t = p.req_to_token + int64_t(row) * p.req_to_token_stride;

  // ---- packed tile j -> staging slot j & 1 (7 fields; a tile spans 64 / min(P, 64) pages). The page
  // ids come from tile_pages() one tile earlier, so the req_to_token load is off the issue path.
  const int seg = P < kTile ? P : kTile;
  const int nseg = kTile / seg;
  auto tile_pages = [&](int j, int (&pid)[2]) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {  // unrolled over the 2-entry bound: registers, not a stack array
      const int pg = (j * kTile + s * seg) / P;
      pid[s] = s < nseg && pg < npk ? r2t[int64_t(pg) * P] / P : -1;
    }
  };
  // A tile is one or two page segments (seg tokens each). Each 16-byte chunk's segment is chosen by a
  // compare and a select (no runtime division, nothing indexed by it: registers, not local memory).
  auto issue_packed = [&](int j, const int (&pid)[2]) {
    unsigned char* st = smem + G::ST_OFF + (j & 1) * G::STAGE_B;
    const bool ok0 = pid[0] >= 0, ok1 = pid[1] >= 0;
    const int tok0 = (j * kTile) % P, tok1 = (j * kTile + seg) % P;
    const int64_t pg0 = ok0 ? pid[0] : 0, pg1 = ok1 ? pid[1] : 0;
    const int64_t ph0 = pg0 * p.H + h, ph1 = pg1 * p.H + h;
    // src + (ph * unit_per_head + page * unit_per_page + tok * unit_per_tok) is a segment's first byte
    auto field = [&](int dst_off, const unsigned char* src, int64_t unit_per_head, int64_t unit_per_tok, int seg_b,
                     int64_t unit_per_page = 0) {
      const unsigned char* from0 = src + ph0 * unit_per_head + pg0 * unit_per_page + tok0 * unit_per_tok;
      const unsigned char* from1 = src + ph1 * unit_per_head + pg1 * unit_per_page + tok1 * unit_per_tok - seg_b;
      const int n = nseg * seg_b;
      for (int c = tid * 16; c < n; c += kXThreads * 16) {
        const bool second = c >= seg_b;  // at most two segments
        const bool ok = second ? ok1 : ok0;
        cp16(st + dst_off + c, ok ? (second ? from1 : from0) + c : src, ok);
      }
    };
    const int gpp = P / 32;  // K groups per page
    field(0, reinterpret_cast<const unsigned char*>(p.k_codes), int64_t(gpp) * D * BITS * 4, D * BITS * 4 / 32,
          seg / 32 * D * BITS * 4);
    field(G::OFF_KS, reinterpret_cast<const unsigned char*>(p.k_scale), int64_t(gpp) * D * 2, D * 2 / 32,
          seg / 32 * D * 2);
    field(G::OFF_KZ, reinterpret_cast<const unsigned char*>(p.k_zero), int64_t(gpp) * D * 2, D * 2 / 32,
          seg / 32 * D * 2);
    field(G::OFF_VC, reinterpret_cast<const unsigned char*>(p.v_codes), int64_t(P) * D * BITS / 8, D * BITS / 8,
          seg * D * BITS / 8);
    field(G::OFF_VS, reinterpret_cast<const unsigned char*>(p.v_scale), int64_t(P) * (D / 32) * 2, (D / 32) * 2,
          seg * (D / 32) * 2);
    field(G::OFF_VZ, reinterpret_cast<const unsigned char*>(p.v_zero), int64_t(P) * (D / 32) * 2, (D / 32) * 2,
          seg * (D / 32) * 2);
    // k_norm is [pages, P]: no head axis
    field(G::OFF_KN, reinterpret_cast<const unsigned char*>(p.k_norm), 0, 4, seg * 4, int64_t(P) * 4);
  };

  int pid[2] = {-1, -1};
  if (pj0 < pj1) {
    tile_pages(pj0, pid);
    issue_packed(pj0, pid);
  }
  cp_commit();
  if (pj0 + 1 < pj1) {
    tile_pages(pj0 + 1, pid);
    issue_packed(pj0 + 1, pid);
  }
  cp_commit();

  // ---- queries: raw copy (model dtype) for the raw phase; rotated and scaled by each row's max |q|
  // into fp16 for the packed phase (the scale goes into the logits in fp32)
  for (int i = 0; i < 16; ++i) {
    const int r = warp * 16 + i, tb = r / g;
    const T* src = tb < ntok && r < TB * g
                       ? static_cast<const T*>(p.q) + (int64_t(q_start + t0 + tb) * p.Hq + h * g + r % g) * D
                       : nullptr;
    const float mx = prepare_query<T, D / 32>(src, p.rotate, qr_s + r * LDQ, q_s + r * LDQ);
    if (lane == 0) qsc_s[r] = mx * p.sm_scale * kLog2eX;
  }
  __syncthreads();

  // this thread's two rows: position and quantized boundary (a padding row sees nothing)
  int pos[2], qb[2];
  float qsc[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = warp * 16 + gid + 8 * i, tb = r / g;
    const bool ok = tb < ntok && r < TB * g;
    pos[i] = ok ? prefix + t0 + tb : -1;
    qb[i] = ok ? qbound(pos[i]) : 0;
    qsc[i] = qsc_s[r];
  }

  float O[D / 8][4];
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) O[nt][0] = O[nt][1] = O[nt][2] = O[nt][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  uint32_t qf[D / 16][4];
  float S[8][4];

  // ---- packed phase
  if (pj0 < pj1) load_q_frags<D>(qf, q_s, warp, lane);
  for (int j = pj0; j < pj1; ++j) {
    if (j + 2 < pj1) tile_pages(j + 2, pid);  // lands while tile j is dequantized
    cp_wait<1>();
    __syncthreads();  // tile j landed; every warp is done with the previous K / V tiles
    const unsigned char* st = smem + G::ST_OFF + (j & 1) * G::STAGE_B;
    {
      const uint32_t* kc = reinterpret_cast<const uint32_t*>(st);
      const __half* ks = reinterpret_cast<const __half*>(st + G::OFF_KS);
      const __half* kz = reinterpret_cast<const __half*>(st + G::OFF_KZ);
      constexpr int KPW = 32 / BITS;  // tokens per K word
#pragma unroll 2
      for (int idx = tid; idx < 2 * D * BITS; idx += kXThreads) {
        const int w = idx % BITS, d = (idx / BITS) % D, grp = idx / (BITS * D);
        uint32_t mm, zp;
        const __half s = ks[grp * D + d], z = kz[grp * D + d];
        scale_pair<BITS>(pack_h2(s, s), pack_h2(z, z), mm, zp);
        uint32_t o[16 / BITS];
        dq_word<BITS>(kc[idx], mm, zp, o);
        uint4* dst = reinterpret_cast<uint4*>(k_s + d * LDKT + grp * 32 + w * KPW);
#pragma unroll
        for (int u = 0; u < KPW / 8; ++u) dst[u] = make_uint4(o[4 * u], o[4 * u + 1], o[4 * u + 2], o[4 * u + 3]);
      }
      const uint32_t* vc = reinterpret_cast<const uint32_t*>(st + G::OFF_VC);
      const __half* vsc = reinterpret_cast<const __half*>(st + G::OFF_VS);
      const __half* vzr = reinterpret_cast<const __half*>(st + G::OFF_VZ);
      constexpr int WPT = D * BITS / 32;  // V words per token
      constexpr int CPW = 32 / BITS;      // channels per V word
#pragma unroll 2
      for (int idx = tid; idx < kTile * WPT; idx += kXThreads) {
        const int t = idx / WPT, w = idx % WPT, c0 = w * CPW;
        uint32_t mm, zp;
        const __half s = vsc[t * (D / 32) + c0 / 32], z = vzr[t * (D / 32) + c0 / 32];
        scale_pair<BITS>(pack_h2(s, s), pack_h2(z, z), mm, zp);
        uint32_t o[16 / BITS];
        dq_word<BITS>(vc[idx], mm, zp, o);
        uint4* dst = reinterpret_cast<uint4*>(v_s + t * LDQ + c0);
#pragma unroll
        for (int u = 0; u < CPW / 8; ++u) dst[u] = make_uint4(o[4 * u], o[4 * u + 1], o[4 * u + 2], o[4 * u + 3]);
      }
    }
    float2 nrm[8];  // token norms of this thread's columns, read before the slot is reused
    const float* kn = reinterpret_cast<const float*>(st + G::OFF_KN);
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) nrm[nt] = *reinterpret_cast<const float2*>(kn + nt * 8 + 2 * tig);
    __syncthreads();  // tiles dequantized; the staging slot is free
    if (j + 2 < pj1) issue_packed(j + 2, pid);
    cp_commit();

    qk_tile<__half, D, true>(qf, k_s, S, lane);
    if ((j + 1) * kTile <= raw_lo) {  // below every row's boundary (the CTA's first row has the lowest)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        S[nt][0] = S[nt][0] * nrm[nt].x * qsc[0];
        S[nt][1] = S[nt][1] * nrm[nt].y * qsc[0];
        S[nt][2] = S[nt][2] * nrm[nt].x * qsc[1];
        S[nt][3] = S[nt][3] * nrm[nt].y * qsc[1];
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int c = j * kTile + nt * 8 + 2 * tig;
        S[nt][0] = c < qb[0] ? S[nt][0] * nrm[nt].x * qsc[0] : -INFINITY;
        S[nt][1] = c + 1 < qb[0] ? S[nt][1] * nrm[nt].y * qsc[0] : -INFINITY;
        S[nt][2] = c < qb[1] ? S[nt][2] * nrm[nt].x * qsc[1] : -INFINITY;
        S[nt][3] = c + 1 < qb[1] ? S[nt][3] * nrm[nt].y * qsc[1] : -INFINITY;
      }
    }
    online_softmax<D>(S, m, l, O);
    pv_tile<__half, D>(S, v_s, O, lane);
  }

  // ---- raw phase: keys raw_lo .. pos_last of this request, scratch index raw_off + (x - base)
  const T* rk = static_cast<const T*>(p.raw_k);
  const T* rv = static_cast<const T*>(p.raw_v);
  auto issue_raw = [&](const T* src, __half* dst, int j) {
    constexpr int CPR = D / 8;  // 16-byte chunks per token row
    for (int c = tid; c < kTile * CPR; c += kXThreads) {
      const int t = c / CPR, part = c % CPR;
      const int x = raw_lo + j * kTile + t;
      const bool ok = x <= pos_last;
      const T* from = src + (int64_t(raw_off + x - base) * p.H + h) * D + part * 8;
      cp16(dst + t * LDQ + part * 8, ok ? from : src, ok);
    }
  };
  cp_wait<0>();
  __syncthreads();  // packed readers are done with the K / V buffers
  if (rj0 < rj1) {
    load_q_frags<D>(qf, reinterpret_cast<const __half*>(qr_s), warp, lane);
    issue_raw(rk, k_s, rj0);
  }
  cp_commit();
  const float sc = p.sm_scale * kLog2eX;
  for (int j = rj0; j < rj1; ++j) {
    issue_raw(rv, v_s, j);
    cp_commit();
    cp_wait<1>();
    __syncthreads();  // K_j landed
    qk_tile<T, D, false>(qf, k_s, S, lane);
    __syncthreads();  // every warp is done with K_j
    if (j + 1 < rj1) issue_raw(rk, k_s, j + 1);
    cp_commit();
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int x = raw_lo + j * kTile + nt * 8 + 2 * tig;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        S[nt][2 * i] = (x >= qb[i] && x <= pos[i]) ? S[nt][2 * i] * sc : -INFINITY;
        S[nt][2 * i + 1] = (x + 1 >= qb[i] && x + 1 <= pos[i]) ? S[nt][2 * i + 1] * sc : -INFINITY;
      }
    }
    online_softmax<D>(S, m, l, O);
    cp_wait<1>();
    __syncthreads();  // V_j landed
    pv_tile<T, D>(S, v_s, O, lane);
    __syncthreads();  // every warp is done with V_j
  }

  // ---- epilogue: rows' sums across the quad, normalize, store
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    if (pos[i] < 0) continue;
    const int r = warp * 16 + gid + 8 * i;
    const int64_t tokq = int64_t(q_start + t0 + r / g) * p.Hq + h * g + r % g;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;  // nothing visible: 0 (and lse -inf)
    if (p.splits > 1) {
      const int64_t part = int64_t(blockIdx.z) * p.T * p.Hq + tokq;
      float* po = p.part_o + part * D;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt)
        *reinterpret_cast<float2*>(po + nt * 8 + 2 * tig) = make_float2(O[nt][2 * i] * inv, O[nt][2 * i + 1] * inv);
      if (tig == 0) p.part_lse[part] = l[i] > 0.f ? m[i] + log2f(l[i]) : -INFINITY;
      continue;
    }
    T* dst = static_cast<T*>(p.out) + tokq * D;
#pragma unroll
    for (int nt = 0; nt < D / 8; ++nt)
      *reinterpret_cast<uint32_t*>(dst + nt * 8 + 2 * tig) = DT<T>::pack(O[nt][2 * i] * inv, O[nt][2 * i + 1] * inv);
    if (p.lse && tig == 0) p.lse[tokq] = l[i] > 0.f ? m[i] + log2f(l[i]) : -INFINITY;
  }
}

// One warp per (token, query head): lane s holds split s's lse; the partials weighted by
// 2^(lse_s - max) and renormalized, the lse of the union written on request.
template <typename T, int D>
__global__ void __launch_bounds__(256) extend_combine(const ExtendParams p) {
  constexpr int C = D / 32;  // channels per lane
  const int lane = threadIdx.x & 31;
  const int64_t n = int64_t(p.T) * p.Hq;
  const int64_t item = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (item >= n) return;
  const float ls = lane < p.splits ? p.part_lse[lane * n + item] : -INFINITY;
  float mx = ls;
#pragma unroll
  for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const float w = ls == -INFINITY ? 0.f : exp2f(ls - mx);
  float tot = w;
#pragma unroll
  for (int o = 16; o; o >>= 1) tot += __shfl_xor_sync(0xffffffffu, tot, o);
  float acc[C];
#pragma unroll
  for (int c = 0; c < C; ++c) acc[c] = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    const float ws = __shfl_sync(0xffffffffu, w, s);
    if (ws == 0.f) continue;  // the same for the whole warp
    const float* src = p.part_o + (s * n + item) * D + lane * C;
    float v[C];
    if constexpr (C == 4) {
      const float4 x = *reinterpret_cast<const float4*>(src);
      v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
    } else {
      const float2 x = *reinterpret_cast<const float2*>(src);
      v[0] = x.x; v[1] = x.y;
    }
#pragma unroll
    for (int c = 0; c < C; ++c) acc[c] += ws * v[c];
  }
  const float inv = tot > 0.f ? 1.f / tot : 0.f;
  T* dst = static_cast<T*>(p.out) + item * D + lane * C;
#pragma unroll
  for (int c = 0; c < C; c += 2) *reinterpret_cast<uint32_t*>(dst + c) = DT<T>::pack(acc[c] * inv, acc[c + 1] * inv);
  if (p.lse && lane == 0) p.lse[item] = tot > 0.f ? mx + log2f(tot) : -INFINITY;
}

template <typename T, int D, int BITS, int WARPS>
void launch_rows(const ExtendParams& p, cudaStream_t stream) {
  using G = XGeo<D, BITS, WARPS>;
  auto kern = extend_kernel<T, D, BITS, WARPS>;
  cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, G::SMEM);
  if (p.num_blocks <= 0) return;
  kern<<<dim3(p.num_blocks, p.H, p.splits), WARPS * 32, G::SMEM, stream>>>(p);
  if (p.splits > 1) {
    const int64_t n = int64_t(p.T) * p.Hq;
    extend_combine<T, D><<<unsigned((n + 7) / 8), 256, 0, stream>>>(p);
  }
}

template <typename T, int D, int BITS>
void launch_extend_t(const ExtendParams& p, cudaStream_t stream) {
  if (p.rows == 128) return launch_rows<T, D, BITS, 8>(p, stream);
  launch_rows<T, D, BITS, 4>(p, stream);
}

template <int D, int BITS>
int max_rows() {
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  // 128 rows need 62-127 KB: more than the 99 KB of an sm_86/89 CTA at head_dim 128.
  return XGeo<D, BITS, 8>::SMEM <= optin ? 128 : 64;
}

}  // namespace

int extend_max_rows(int head_dim, int bits) {
  if (head_dim == 64) return bits == 2 ? max_rows<64, 2>() : max_rows<64, 4>();
  return bits == 2 ? max_rows<128, 2>() : max_rows<128, 4>();
}

void launch_extend(const ExtendParams& p, int head_dim, int bits, bool bf16, cudaStream_t stream) {
  if (bf16) {
    if (head_dim == 64 && bits == 2) return launch_extend_t<__nv_bfloat16, 64, 2>(p, stream);
    if (head_dim == 64 && bits == 4) return launch_extend_t<__nv_bfloat16, 64, 4>(p, stream);
    if (head_dim == 128 && bits == 2) return launch_extend_t<__nv_bfloat16, 128, 2>(p, stream);
    if (head_dim == 128 && bits == 4) return launch_extend_t<__nv_bfloat16, 128, 4>(p, stream);
  } else {
    if (head_dim == 64 && bits == 2) return launch_extend_t<__half, 64, 2>(p, stream);
    if (head_dim == 64 && bits == 4) return launch_extend_t<__half, 64, 4>(p, stream);
    if (head_dim == 128 && bits == 2) return launch_extend_t<__half, 128, 2>(p, stream);
    if (head_dim == 128 && bits == 4) return launch_extend_t<__half, 128, 4>(p, stream);
  }
}

}  // namespace oscar
