"""The `oscar` attention backend: attention over the packed pool, packing pages as they fill.

Per request and layer, one step (prefill chunk, mixed chunk or decode token) does:
  1. raw = the request's residual (its partial last page) + this step's raw K/V;
  2. every page that raw completes is packed into the pool (quant.store_pages / the CUDA store);
  3. the new partial page goes back to the residual row;
  4. attention: each query sees earlier pages through their packed form and the rest raw
     (reference.attend; the query's quantized boundary comes from reference.boundaries).
Packing before attention is what makes prefill page-consistent: a query attends to its earlier
pages exactly as a later decode step will. On CUDA, decode runs the fused kernels (wrapper.py).
"""
from __future__ import annotations

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from . import quant
from .layout import FIELDS
from .reference import attend, boundaries


def store(k, v, page_ids, pages, cfg):
    """Pack full pages k, v [N, P, H, D] into pool pages `page_ids` [N]."""
    if k.is_cuda:
        from .wrapper import store_pages
        store_pages(k, v, page_ids, pages, cfg)
        return
    packed = quant.store_pages(k, v, cfg)
    for f in FIELDS:
        pages[f][page_ids] = packed[f]


class OscarAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        from .pool import OscarKVPool
        from .plugin import verify_hooks

        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, OscarKVPool):
            raise RuntimeError(f"the oscar backend needs the OScaR KV pool, got {type(pool).__name__} "
                               "(the plugin's pool hook did not take effect)")
        verify_hooks(model_runner)
        self.device = model_runner.device
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = pool
        self.cfg = pool.oscar
        self.forward_metadata = None
        self._decode = None  # CUDA DecodeWrapper, built lazily

    # ---- metadata: host-side lists, once per batch ---------------------------------------------
    def init_forward_metadata(self, fb):
        rows = fb.req_pool_indices.tolist()
        seq = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        if fb.forward_mode.is_decode():
            ext = [1] * len(rows)
        else:
            ext = list(fb.extend_seq_lens_cpu)
        prefix = [s - e for s, e in zip(seq, ext)]
        self.forward_metadata = (rows, prefix, ext)
        if self._decode is not None and fb.forward_mode.is_decode():
            self._plan_decode(rows, seq)

    # ---- forward ---------------------------------------------------------------------------
    def _check(self, layer, save_kv_cache):
        if not save_kv_cache:
            raise RuntimeError("the oscar backend must write the KV cache itself (save_kv_cache=False)")
        if layer.is_cross_attention or (layer.logit_cap or 0) > 0 or (layer.sliding_window_size or -1) > -1:
            raise RuntimeError("the oscar backend supports causal self-attention without softcap or sliding window")

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        self._check(layer, save_kv_cache)
        return self._forward_requests(q, k, v, layer)

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        self._check(layer, save_kv_cache)
        return self._forward_requests(q, k, v, layer)

    def _forward_requests(self, q, k, v, layer):
        cfg, P = self.cfg, self.cfg.page_size
        Hq, H, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q = q.reshape(-1, Hq, D)
        k = k.reshape(-1, H, D)
        v = v.reshape(-1, H, D)
        pages, res_k, res_v = self.token_to_kv_pool.layer(layer.layer_id)
        req_to_token = self.req_to_token_pool.req_to_token
        out = torch.empty_like(q)
        rows, prefixes, exts = self.forward_metadata
        start = 0
        for row, prefix, ext in zip(rows, prefixes, exts):
            end = start + ext
            seq = prefix + ext
            base = (prefix // P) * P
            raw_k = torch.cat([res_k[row, : prefix - base], k[start:end]])
            raw_v = torch.cat([res_v[row, : prefix - base], v[start:end]])
            full = seq // P
            slots = req_to_token[row, : full * P : P]
            page_ids = (slots // P).long()
            first = prefix // P
            if full > first:  # pages this step completes: pack them now (before any later reader)
                n = full - first
                store(raw_k[: n * P].view(n, P, H, D), raw_v[: n * P].view(n, P, H, D),
                      page_ids[first:full], pages, cfg)
            tail = seq - full * P
            if tail:
                res_k[row, :tail] = raw_k[full * P - base:]
                res_v[row, :tail] = raw_v[full * P - base:]
            q_pos = torch.arange(prefix, seq, device=q.device)
            qb = boundaries(q_pos, prefix, cfg)
            need = int(qb.max()) // P
            gathered = {f: pages[f][page_ids[:need]] for f in FIELDS} if need else None
            o = attend(q[start:end], q_pos, qb, gathered, raw_k, raw_v, base, cfg, layer.scaling)
            out[start:end] = o.to(out.dtype)
            start = end
        return out.reshape(-1, Hq * D)

    def _plan_decode(self, rows, seq):
        pass

    def support_triton(self):
        return False
