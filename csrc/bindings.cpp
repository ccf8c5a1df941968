// Python bindings of the OScaR kernels: argument checks, then the launchers in kernels.h.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "kernels.h"

namespace {

#define CHECK_T(x, dt)                                                                        \
  TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor");                                    \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous");                                 \
  TORCH_CHECK((x).scalar_type() == (dt), #x " has dtype ", (x).scalar_type(), ", expected ", (dt)); \
  TORCH_CHECK(reinterpret_cast<uintptr_t>((x).data_ptr()) % 16 == 0, #x " must be 16-byte aligned")

bool model_dtype(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 || x.scalar_type() == torch::kHalf,
              "model tensors must be bfloat16 or float16, got ", x.scalar_type());
  return x.scalar_type() == torch::kBFloat16;
}

void check_pool(const torch::Tensor& kc, const torch::Tensor& ks, const torch::Tensor& kz, const torch::Tensor& vc,
                const torch::Tensor& vs, const torch::Tensor& vz, const torch::Tensor& kn, int H, int P, int D,
                int bits) {
  CHECK_T(kc, torch::kInt32); CHECK_T(ks, torch::kHalf); CHECK_T(kz, torch::kHalf);
  CHECK_T(vc, torch::kInt32); CHECK_T(vs, torch::kHalf); CHECK_T(vz, torch::kHalf);
  CHECK_T(kn, torch::kFloat32);
  const int64_t n = kc.size(0);
  TORCH_CHECK(kc.dim() == 5 && kc.size(1) == H && kc.size(2) == P / 32 && kc.size(3) == D && kc.size(4) == bits,
              "k_codes must be [pages, H, P/32, D, bits]");
  TORCH_CHECK(ks.sizes() == torch::IntArrayRef({n, H, P / 32, D}) && kz.sizes() == ks.sizes(),
              "k_scale/k_zero must be [pages, H, P/32, D]");
  TORCH_CHECK(vc.sizes() == torch::IntArrayRef({n, H, P, D * bits / 32}), "v_codes must be [pages, H, P, D*bits/32]");
  TORCH_CHECK(vs.sizes() == torch::IntArrayRef({n, H, P, D / 32}) && vz.sizes() == vs.sizes(),
              "v_scale/v_zero must be [pages, H, P, D/32]");
  TORCH_CHECK(kn.sizes() == torch::IntArrayRef({n, P}), "k_norm must be [pages, P]");
}

// The pool's seven field pointers, into any kernel's params (the store's are writable, the others'
// const: a mutable pointer converts to both).
template <typename Params>
void pool_ptrs(Params& p, const torch::Tensor& kc, const torch::Tensor& ks, const torch::Tensor& kz,
               const torch::Tensor& vc, const torch::Tensor& vs, const torch::Tensor& vz, const torch::Tensor& kn) {
  p.k_codes = kc.data_ptr<int32_t>();
  p.k_scale = reinterpret_cast<__half*>(ks.data_ptr<at::Half>());
  p.k_zero = reinterpret_cast<__half*>(kz.data_ptr<at::Half>());
  p.v_codes = vc.data_ptr<int32_t>();
  p.v_scale = reinterpret_cast<__half*>(vs.data_ptr<at::Half>());
  p.v_zero = reinterpret_cast<__half*>(vz.data_ptr<at::Half>());
  p.k_norm = kn.data_ptr<float>();
}

// The supported matrix mirrors sglang_oscar/shapes.py (KERNEL_PAGE_SIZES, KERNEL_HEAD_DIMS, BITS).
void check_shape(int P, int D, int64_t bits) {
  TORCH_CHECK(P == 32 || P == 64 || P == 128, "page size must be 32, 64 or 128, got ", P);
  TORCH_CHECK(D == 64 || D == 128, "head_dim must be 64 or 128, got ", D);
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4, got ", bits);
}

// An optional int64 index vector: an empty tensor means "none" (null pointer).
const int64_t* opt_index(const torch::Tensor& t, int64_t n, const char* name) {
  if (t.numel() == 0) return nullptr;
  CHECK_T(t, torch::kInt64);
  TORCH_CHECK(t.numel() == n, name, " must hold ", n, " entries, got ", t.numel());
  return t.data_ptr<int64_t>();
}

void store(torch::Tensor k, torch::Tensor v, torch::Tensor page_ids, torch::Tensor src_rows, torch::Tensor src_tok,
           torch::Tensor kc, torch::Tensor ks, torch::Tensor kz, torch::Tensor vc, torch::Tensor vs, torch::Tensor vz,
           torch::Tensor kn, int64_t bits, bool rotate, bool token_norm, torch::Tensor norm_sq) {
  const bool bf16 = model_dtype(k);
  CHECK_T(k, k.scalar_type()); CHECK_T(v, k.scalar_type()); CHECK_T(page_ids, torch::kInt64);
  TORCH_CHECK(v.sizes() == k.sizes(), "k and v must have one shape");
  TORCH_CHECK(kn.dim() == 2, "k_norm must be [pages, P]");
  const int N = page_ids.numel(), P = kn.size(1);
  // Page n is row n of k/v [rows, P, H, D]; row src_rows[n]; or, with src_tok, the P tokens from
  // token src_tok[n] of k/v [tokens, H, D] (values unchecked: on the device).
  const int64_t* toks = opt_index(src_tok, N, "src_tok");
  const int64_t* rows = opt_index(src_rows, N, "src_rows");
  TORCH_CHECK(!(toks && rows), "src_rows or src_tok, not both");
  TORCH_CHECK(toks ? k.dim() == 3 : (k.dim() == 4 && k.size(1) == P),
              toks ? "with src_tok, k and v must be [tokens, H, D]" : "k, v must be [rows, P, H, D]");
  const int H = k.size(-2), D = k.size(-1);
  check_shape(P, D, bits);
  TORCH_CHECK(toks || rows || k.size(0) == N, "one page id per row of k/v");
  check_pool(kc, ks, kz, vc, vs, vz, kn, H, P, D, bits);
  // Optional squared token norms over all KV heads, one per token of k: [rows, P] fp32 (empty: none).
  const float* nsq = nullptr;
  if (norm_sq.numel()) {
    CHECK_T(norm_sq, torch::kFloat32);
    TORCH_CHECK(norm_sq.numel() == k.numel() / (H * D), "norm_sq must hold one value per token of k");
    nsq = norm_sq.data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(k.device());
  oscar::StoreParams p;
  p.k = k.data_ptr(); p.v = v.data_ptr(); p.src_rows = rows; p.src_tok = toks; p.page_ids = page_ids.data_ptr<int64_t>();
  p.N = N; p.P = P; p.H = H; p.rotate = rotate; p.token_norm = token_norm;
  p.norm_sq = nsq;
  pool_ptrs(p, kc, ks, kz, vc, vs, vz, kn);
  oscar::launch_store(p, D, bits, bf16, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void decode(torch::Tensor q, torch::Tensor kc, torch::Tensor ks, torch::Tensor kz, torch::Tensor vc, torch::Tensor vs,
            torch::Tensor vz, torch::Tensor kn, torch::Tensor page_table, torch::Tensor page_rows,
            int64_t page_col_step, int64_t page_shift, torch::Tensor num_pages, torch::Tensor res_k,
            torch::Tensor res_v, torch::Tensor res_rows, torch::Tensor res_len, torch::Tensor part_o,
            torch::Tensor part_lse, torch::Tensor out, torch::Tensor lse, int64_t splits, int64_t q_chunks,
            double sm_scale, int64_t bits, bool rotate) {
  const bool bf16 = model_dtype(q);
  CHECK_T(q, q.scalar_type()); CHECK_T(out, q.scalar_type());
  CHECK_T(res_k, q.scalar_type()); CHECK_T(res_v, q.scalar_type());
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [B, Hq, D]");
  TORCH_CHECK(res_k.dim() == 4 && res_v.sizes() == res_k.sizes(), "res_k/res_v must be [R, P, H, D]");
  const int B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int P = res_k.size(1), H = res_k.size(2);
  TORCH_CHECK(res_k.size(3) == D, "head_dim mismatch between q and residual");
  check_shape(P, D, bits);
  TORCH_CHECK(Hq % H == 0, "query heads must be a multiple of KV heads");
  check_pool(kc, ks, kz, vc, vs, vz, kn, H, P, D, bits);
  TORCH_CHECK(page_table.is_cuda() && page_table.scalar_type() == torch::kInt32 && page_table.dim() == 2,
              "page_table must be a CUDA int32 2-D tensor");
  TORCH_CHECK(page_col_step >= 1 && page_table.stride(1) * page_col_step < (1 << 30) && page_shift >= 0 &&
                  page_shift < 31, "page_col_step must be >= 1 and page_shift in 0..30");
  const int64_t* prow = opt_index(page_rows, B, "page_rows");
  TORCH_CHECK(prow || page_table.size(0) >= B, "page_table needs a row per query");
  CHECK_T(num_pages, torch::kInt32); CHECK_T(res_rows, torch::kInt64); CHECK_T(res_len, torch::kInt32);
  TORCH_CHECK(num_pages.numel() == B && res_rows.numel() == B && res_len.numel() == B,
              "num_pages, res_rows and res_len need one entry per query");
  TORCH_CHECK(splits >= 1 && int64_t(B) * splits <= 65535, "splits must be >= 1 and queries x splits <= 65535");
  CHECK_T(part_o, torch::kFloat32); CHECK_T(part_lse, torch::kFloat32);
  TORCH_CHECK(splits == 1 || (part_o.numel() >= int64_t(B) * splits * Hq * D &&
                              part_lse.numel() >= int64_t(B) * splits * Hq),
              "workspace too small for ", B, " queries x ", splits, " splits");
  const bool want_lse = lse.numel() > 0;  // an empty tensor: no lse wanted
  if (want_lse) {
    CHECK_T(lse, torch::kFloat32);
    TORCH_CHECK(lse.numel() >= int64_t(B) * Hq, "lse must hold [B, Hq] floats");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  oscar::DecodeParams p;
  p.q = q.data_ptr();
  pool_ptrs(p, kc, ks, kz, vc, vs, vz, kn);
  p.page_table = page_table.data_ptr<int32_t>();
  p.page_rows = prow;
  p.page_row_stride = page_table.stride(0);
  p.page_col_stride = int(page_table.stride(1) * page_col_step);
  p.page_shift = int(page_shift);
  p.num_pages = num_pages.data_ptr<int32_t>();
  p.res_k = res_k.data_ptr(); p.res_v = res_v.data_ptr();
  p.res_rows = res_rows.data_ptr<int64_t>(); p.res_len = res_len.data_ptr<int32_t>();
  p.part_o = part_o.data_ptr<float>(); p.part_lse = part_lse.data_ptr<float>();
  p.out = out.data_ptr();
  p.lse = want_lse ? lse.data_ptr<float>() : nullptr;
  p.B = B; p.Hq = Hq; p.H = H; p.P = P; p.splits = int(splits); p.q_chunks = int(q_chunks);
  p.sm_scale = float(sm_scale); p.rotate = rotate;
  oscar::launch_decode(p, D, bits, bf16, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t blocks_per_sm(int64_t head_dim, int64_t bits, bool bf16) {
  return oscar::decode_blocks_per_sm(head_dim, bits, bf16);
}

int64_t extend_max_rows(int64_t head_dim, int64_t bits) { return oscar::extend_max_rows(head_dim, bits); }

// Extend (prefill) attention over packed pages + the step's raw tokens (csrc/extend.cu).
void extend(torch::Tensor q, torch::Tensor kc, torch::Tensor ks, torch::Tensor kz, torch::Tensor vc, torch::Tensor vs,
            torch::Tensor vz, torch::Tensor kn, torch::Tensor req_to_token, torch::Tensor raw_k, torch::Tensor raw_v,
            torch::Tensor req_info, torch::Tensor blk_start, torch::Tensor out, torch::Tensor lse, int64_t num_blocks,
            int64_t rows, int64_t tok_per_blk, double sm_scale, int64_t bits, bool rotate, bool chunk,
            int64_t splits, torch::Tensor part_o, torch::Tensor part_lse) {
  const bool bf16 = model_dtype(q);
  CHECK_T(q, q.scalar_type()); CHECK_T(out, q.scalar_type());
  CHECK_T(raw_k, q.scalar_type()); CHECK_T(raw_v, q.scalar_type());
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes(), "q and out must be [T, Hq, D]");
  TORCH_CHECK(raw_k.dim() == 3 && raw_v.sizes() == raw_k.sizes(), "raw_k/raw_v must be [N, H, D]");
  const int Hq = q.size(1), D = q.size(2), H = kc.size(1), P = kn.size(1);
  TORCH_CHECK(raw_k.size(1) == H && raw_k.size(2) == D, "raw_k must be [N, H, D] with the pool's H and q's D");
  TORCH_CHECK(P == 32 || P == 64 || P == 128, "page size must be 32, 64 or 128");
  TORCH_CHECK(D == 64 || D == 128, "head_dim must be 64 or 128");
  TORCH_CHECK(bits == 2 || bits == 4, "bits must be 2 or 4");
  TORCH_CHECK(rows == 64 || rows == 128, "rows must be 64 or 128");
  TORCH_CHECK(Hq % H == 0 && Hq / H <= rows, "query heads must be a multiple of KV heads, at most rows per KV head");
  TORCH_CHECK(tok_per_blk == rows / (Hq / H), "tok_per_blk must be rows / (Hq / H)");
  check_pool(kc, ks, kz, vc, vs, vz, kn, H, P, D, bits);
  TORCH_CHECK(req_to_token.is_cuda() && req_to_token.scalar_type() == torch::kInt32 && req_to_token.dim() == 2 &&
                  req_to_token.stride(1) == 1,
              "req_to_token must be a CUDA int32 [rows, slots] tensor with unit column stride");
  CHECK_T(req_info, torch::kInt32); CHECK_T(blk_start, torch::kInt32);
  TORCH_CHECK(req_info.dim() == 2 && req_info.size(1) == 8, "req_info must be [B, 8]");
  const int B = req_info.size(0);
  TORCH_CHECK(blk_start.numel() == B + 1, "blk_start must hold B + 1 entries");
  const bool want_lse = lse.numel() > 0;
  if (want_lse) {
    CHECK_T(lse, torch::kFloat32);
    TORCH_CHECK(lse.numel() >= q.size(0) * Hq, "lse must hold [T, Hq] floats");
  }
  TORCH_CHECK(splits >= 1 && splits <= oscar::kMaxExtendSplits, "splits must be 1..", oscar::kMaxExtendSplits);
  if (splits > 1) {
    CHECK_T(part_o, torch::kFloat32); CHECK_T(part_lse, torch::kFloat32);
    TORCH_CHECK(part_o.is_contiguous() && part_o.numel() >= splits * q.size(0) * Hq * D,
                "part_o must hold [splits, T, Hq, D] floats");
    TORCH_CHECK(part_lse.is_contiguous() && part_lse.numel() >= splits * q.size(0) * Hq,
                "part_lse must hold [splits, T, Hq] floats");
  }
  const c10::cuda::CUDAGuard guard(q.device());
  oscar::ExtendParams p;
  p.q = q.data_ptr();
  pool_ptrs(p, kc, ks, kz, vc, vs, vz, kn);
  p.req_to_token = req_to_token.data_ptr<int32_t>();
  p.req_to_token_stride = req_to_token.stride(0);
  p.raw_k = raw_k.data_ptr(); p.raw_v = raw_v.data_ptr();
  p.req_info = req_info.data_ptr<int32_t>(); p.blk_start = blk_start.data_ptr<int32_t>();
  p.out = out.data_ptr();
  p.lse = want_lse ? lse.data_ptr<float>() : nullptr;
  p.B = B; p.Hq = Hq; p.H = H; p.P = P; p.num_blocks = num_blocks; p.tok_per_blk = tok_per_blk; p.rows = rows;
  p.sm_scale = float(sm_scale); p.rotate = rotate; p.chunk = chunk;
  p.splits = splits; p.T = q.size(0);
  p.part_o = splits > 1 ? part_o.data_ptr<float>() : nullptr;
  p.part_lse = splits > 1 ? part_lse.data_ptr<float>() : nullptr;
  oscar::launch_extend(p, D, bits, bf16, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Packed pages -> model-dtype K/V for the flash prefill path (csrc/dequant.cu).
void dequant(torch::Tensor kc, torch::Tensor ks, torch::Tensor kz, torch::Tensor vc, torch::Tensor vs,
             torch::Tensor vz, torch::Tensor kn, torch::Tensor page_ids, torch::Tensor out_k, torch::Tensor out_v,
             int64_t bits) {
  const bool bf16 = model_dtype(out_k);
  CHECK_T(out_k, out_k.scalar_type()); CHECK_T(out_v, out_k.scalar_type()); CHECK_T(page_ids, torch::kInt64);
  const int H = kc.size(1), P = kn.size(1), D = kc.size(3), N = page_ids.numel();
  check_shape(P, D, bits);
  check_pool(kc, ks, kz, vc, vs, vz, kn, H, P, D, bits);
  TORCH_CHECK(out_k.dim() == 3 && out_k.size(0) >= int64_t(N) * P && out_k.size(1) == H && out_k.size(2) == D &&
                  out_v.sizes() == out_k.sizes(), "out_k/out_v must be [>= N*P, H, D]");
  const c10::cuda::CUDAGuard guard(out_k.device());
  oscar::DequantParams p;
  pool_ptrs(p, kc, ks, kz, vc, vs, vz, kn);
  p.page_ids = page_ids.data_ptr<int64_t>();
  p.out_k = out_k.data_ptr(); p.out_v = out_v.data_ptr();
  p.N = N; p.P = P; p.H = H;
  oscar::launch_dequant(p, D, bits, bf16, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Row copies of model-dtype K and V rows [*, H, D] (csrc/scratch.cu): dst[dst_idx[i] or i] =
// src[i] >= 0 ? a[src[i]] : b[-1 - src[i]]. a may be a strided view (unit stride inside a row).
void copy_rows(torch::Tensor dst_k, torch::Tensor dst_v, torch::Tensor dst_idx, torch::Tensor a_k, torch::Tensor a_v,
               torch::Tensor b_k, torch::Tensor b_v, torch::Tensor src) {
  model_dtype(dst_k);
  CHECK_T(dst_k, dst_k.scalar_type()); CHECK_T(dst_v, dst_k.scalar_type()); CHECK_T(src, torch::kInt64);
  TORCH_CHECK(dst_v.sizes() == dst_k.sizes(), "dst_k and dst_v must have one shape");
  const int64_t H = dst_k.size(-2), D = dst_k.size(-1), row = H * D, elem = dst_k.element_size();
  TORCH_CHECK((row * elem) % 16 == 0, "a row must be a whole number of 16-byte vectors");
  const int64_t n = src.numel(), vecs = row * elem / 16;
  const int64_t* didx = opt_index(dst_idx, n, "dst_idx");
  TORCH_CHECK(didx || dst_k.numel() / row == n, "without dst_idx, dst holds one row per copy");
  auto stride_of = [&](const torch::Tensor& a, const char* name) {
    TORCH_CHECK(a.is_cuda() && a.scalar_type() == dst_k.scalar_type(), name, " must be a CUDA tensor of dst's dtype");
    TORCH_CHECK(a.dim() == 3 && a.size(1) == H && a.size(2) == D && a.stride(2) == 1 && a.stride(1) == D,
                name, " must be [rows, H, D] with contiguous rows");
    TORCH_CHECK((a.stride(0) * elem) % 16 == 0 && reinterpret_cast<uintptr_t>(a.data_ptr()) % 16 == 0,
                name, "'s rows must be 16-byte aligned");
    return a.stride(0) * elem / 16;
  };
  oscar::CopyRowsParams p;
  p.dst_k = dst_k.data_ptr(); p.dst_v = dst_v.data_ptr(); p.dst_idx = didx;
  p.a_k = a_k.data_ptr(); p.a_v = a_v.data_ptr();
  p.a_stride_k = stride_of(a_k, "a_k"); p.a_stride_v = stride_of(a_v, "a_v");
  p.b_k = p.b_v = nullptr;
  if (b_k.numel()) {
    CHECK_T(b_k, dst_k.scalar_type()); CHECK_T(b_v, dst_k.scalar_type());
    TORCH_CHECK(b_k.size(-1) == D && b_k.size(-2) == H && b_v.sizes() == b_k.sizes(), "b_k, b_v must be [..., H, D]");
    p.b_k = b_k.data_ptr(); p.b_v = b_v.data_ptr();
  }
  p.src = src.data_ptr<int64_t>();
  p.n = n; p.vecs = vecs;
  const c10::cuda::CUDAGuard guard(dst_k.device());
  oscar::launch_copy_rows(p, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Merge of partial attention states by their lse (natural log, any [T, Hq] strides) -> out, lse (log2).
void merge(std::vector<torch::Tensor> outs, std::vector<torch::Tensor> lses, torch::Tensor out, torch::Tensor lse) {
  const bool bf16 = model_dtype(out);
  CHECK_T(out, out.scalar_type());
  TORCH_CHECK(out.dim() == 3 && (out.size(2) == 64 || out.size(2) == 128), "out must be [T, Hq, 64 or 128]");
  const int n = outs.size();
  TORCH_CHECK(n >= 1 && n <= oscar::kMaxMergeParts && int(lses.size()) == n, "1 to 3 parts, one lse each");
  const int64_t T = out.size(0), Hq = out.size(1);
  oscar::MergeParams p;
  for (int i = 0; i < n; ++i) {
    CHECK_T(outs[i], out.scalar_type());
    TORCH_CHECK(outs[i].sizes() == out.sizes(), "every part must be shaped like out");
    const auto& l = lses[i];
    TORCH_CHECK(l.is_cuda() && l.scalar_type() == torch::kFloat32 && l.dim() == 2, "lse must be CUDA float32 2-D");
    const bool head_major = l.size(0) == Hq && l.size(1) >= T;   // FlashAttention's [Hq, total_q]
    TORCH_CHECK(head_major || (l.size(0) == T && l.size(1) == Hq), "lse must be [Hq, T] or [T, Hq]");
    p.o[i] = outs[i].data_ptr();
    p.lse[i] = l.data_ptr<float>();
    p.lse_head_stride[i] = head_major ? l.stride(0) : l.stride(1);
    p.lse_tok_stride[i] = head_major ? l.stride(1) : l.stride(0);
  }
  const bool want_lse = lse.numel() > 0;
  if (want_lse) {
    CHECK_T(lse, torch::kFloat32);
    TORCH_CHECK(lse.numel() >= T * Hq, "lse must hold [T, Hq] floats");
  }
  p.n = n; p.T = T; p.Hq = Hq;
  p.out = out.data_ptr();
  p.lse_out = want_lse ? lse.data_ptr<float>() : nullptr;
  const c10::cuda::CUDAGuard guard(out.device());
  oscar::launch_merge(p, out.size(2), bf16, c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "OScaR packed KV-cache kernels: fused store and paged split-KV decode attention";
  m.def("store", &store, "pack full pages into the pool (in place)");
  m.def("decode", &decode, "paged split-KV decode attention over packed pages + residual");
  m.def("extend", &extend, "extend (prefill) attention over packed pages + the step's raw tokens");
  m.def("dequant", &dequant, "packed pages -> model-dtype K (times its norm) and V");
  m.def("copy_rows", &copy_rows, "row copies of K and V: the extend step's raw scratch and residual tails");
  m.def("merge", &merge, "merge partial attention states by their log-sum-exp");
  m.def("blocks_per_sm", &blocks_per_sm, "resident decode CTAs per SM for a (head_dim, bits, dtype)");
  m.def("extend_max_rows", &extend_max_rows, "most extend rows per CTA this GPU's shared memory allows");
}
