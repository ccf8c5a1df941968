"""OScaR's chunk prefill on CUDA: the in-chunk raw attention and the merge of partial states.

With `--oscar-prefill chunk`, a chunk's queries read their cached prefix's whole pages packed and
everything after them raw (the prefix's partial page, then the chunk itself). The backend splits
that in two partial attention states over disjoint keys and merges them:
  - packed prefix pages: the decode kernel, one query per token, res_len 0, returning lse;
  - raw keys: a ragged causal bf16 prefill (this module), returning lse;
  - merge: out = (2^lse_a o_a + 2^lse_b o_b) / (2^lse_a + 2^lse_b).

    r = RaggedPrefill(num_qo_heads, num_kv_heads, head_dim, dtype, device)
    r.plan(qo_lens, kv_lens, sm_scale)   # once per batch (host lists)
    o, lse = r.run(q, k, v)              # q [T, Hq, D], k/v [S, H, D] ragged; lse [T, Hq], base 2
    o = merge(o_a, lse_a, o_b, lse_b)    # the same queries' states over disjoint keys

Query t of a request with qo_len queries over kv_len keys sits at key kv_len - qo_len + t and sees
the keys up to it (FlashInfer's bottom-right causal mask). FlashInfer (SGLang's own CUDA
dependency) runs both parts where it is installed; the torch twins below are the spec and the
fallback. lse is base 2 throughout, FlashInfer's convention.
"""
from __future__ import annotations

import importlib.util
import itertools
import math

import torch

from .config import OscarConfig
from .reference import attend

WORKSPACE_BYTES = 128 << 20


def flashinfer_usable(device) -> bool:
    return torch.device(device).type == "cuda" and importlib.util.find_spec("flashinfer") is not None


class RaggedPrefill:
    """Causal attention of each request's queries over its own raw keys, with lse."""

    def __init__(self, num_qo_heads, num_kv_heads, head_dim, dtype, device, use_flashinfer=None):
        self.Hq, self.H, self.D, self.dtype = num_qo_heads, num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        self.use_flashinfer = flashinfer_usable(device) if use_flashinfer is None else use_flashinfer
        self._fi = None
        if self.use_flashinfer:
            import flashinfer
            ws = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
            # fa2: one JIT build per head_dim that every CUDA arch shares
            self._fi = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(ws, "NHD", backend="fa2")
        self._lens = None

    def plan(self, qo_lens: list[int], kv_lens: list[int], sm_scale: float):
        if any(q > k for q, k in zip(qo_lens, kv_lens)):
            raise ValueError("every request needs at least as many keys as queries")
        self._lens = (list(qo_lens), list(kv_lens), float(sm_scale))
        if self._fi is not None:
            def indptr(lens):
                return torch.tensor(list(itertools.accumulate(lens, initial=0)), dtype=torch.int32,
                                    device=self.device)
            self._fi.plan(indptr(qo_lens), indptr(kv_lens), self.Hq, self.H, self.D, causal=True,
                          sm_scale=float(sm_scale), q_data_type=self.dtype, kv_data_type=self.dtype)

    def run(self, q, k, v):
        if self._lens is None:
            raise RuntimeError("RaggedPrefill.run before plan")
        if self._fi is not None:
            return self._fi.run(q.contiguous(), k.contiguous(), v.contiguous(), return_lse=True)
        return ragged_reference(q, k, v, *self._lens)


def ragged_reference(q, k, v, qo_lens, kv_lens, sm_scale):
    """Torch twin of RaggedPrefill: one reference.attend call per request (no packed pages)."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    cfg = OscarConfig(method="bf16")  # only read for packed pages, which there are none of here
    qs = ks = 0
    for n_q, n_k in zip(qo_lens, kv_lens):
        pos = torch.arange(n_k - n_q, n_k, device=q.device)
        o, l = attend(q[qs:qs + n_q], pos, torch.zeros_like(pos), None, k[ks:ks + n_k], v[ks:ks + n_k], 0, cfg,
                      sm_scale, return_lse=True)
        out[qs:qs + n_q] = o.to(q.dtype)
        lse[qs:qs + n_q] = l / math.log(2)
        qs, ks = qs + n_q, ks + n_k
    return out, lse


def merge(o_a, lse_a, o_b, lse_b, use_flashinfer=None):
    """Attention over the union of two disjoint key sets from the two partial states (base-2 lse).
    use_flashinfer: None decides from the device (callers on a hot path pass their own decision)."""
    if flashinfer_usable(o_a.device) if use_flashinfer is None else use_flashinfer:
        import flashinfer
        return flashinfer.merge_state(o_a.contiguous(), lse_a.contiguous(), o_b.contiguous(),
                                      lse_b.contiguous())[0]
    return merge_reference(o_a, lse_a, o_b, lse_b)


def merge_reference(o_a, lse_a, o_b, lse_b):
    m = torch.maximum(lse_a, lse_b)
    wa, wb = torch.exp2(lse_a - m)[..., None], torch.exp2(lse_b - m)[..., None]
    return ((o_a.float() * wa + o_b.float() * wb) / (wa + wb)).to(o_a.dtype)
