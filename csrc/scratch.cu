// Row copies of an extend step's raw tokens, K and V in one launch: the flat scratch gathered from
// the step's new tokens and the requests' residual rows, and the new partial pages written back.
// (As indexed torch copies this was a dozen launches per layer, each with its host overhead, more
// than the attention kernel itself for a chat turn's few new tokens.) Bytes are moved as they are.
#include <cuda_runtime.h>

#include "kernels.h"

namespace oscar {
namespace {

constexpr int kCopyThreads = 256;

__global__ void __launch_bounds__(kCopyThreads) copy_rows_kernel(CopyRowsParams p) {
  const int64_t total = int64_t(p.n) * p.vecs;
  const int64_t e = int64_t(blockIdx.x) * kCopyThreads + threadIdx.x;  // one 16-byte vector of K and of V
  if (e < total) {
    const int64_t i = e / p.vecs;
    const int c = int(e - i * p.vecs);
    const int64_t s = p.src[i];
    const int64_t d = p.dst_idx ? p.dst_idx[i] : i;
    const uint4 *sk, *sv;
    if (s >= 0) {
      sk = static_cast<const uint4*>(p.a_k) + s * p.a_stride_k;
      sv = static_cast<const uint4*>(p.a_v) + s * p.a_stride_v;
    } else {
      sk = static_cast<const uint4*>(p.b_k) + (-1 - s) * p.vecs;
      sv = static_cast<const uint4*>(p.b_v) + (-1 - s) * p.vecs;
    }
    static_cast<uint4*>(p.dst_k)[d * p.vecs + c] = sk[c];
    static_cast<uint4*>(p.dst_v)[d * p.vecs + c] = sv[c];
  }
}

}  // namespace

void launch_copy_rows(const CopyRowsParams& p, cudaStream_t stream) {
  const int64_t total = int64_t(p.n) * p.vecs;
  if (total == 0) return;
  copy_rows_kernel<<<unsigned((total + kCopyThreads - 1) / kCopyThreads), kCopyThreads, 0, stream>>>(p);
}

}  // namespace oscar
