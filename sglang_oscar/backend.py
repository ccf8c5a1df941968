"""The `oscar` attention backend: attention over the packed pool, packing pages as they fill.

Per request and layer, one step (prefill chunk, mixed chunk or decode token) does:
  1. raw = the request's residual (its partial last page) + this step's raw K/V;
  2. every page that raw completes is packed into the pool (quant.store_pages / the CUDA store);
  3. the new partial page goes back to the residual row;
  4. attention: each query sees earlier pages through their packed form and the rest raw
     (reference.attend is the spec; batched.py runs it for the whole batch at once on the torch path).
Packing before attention is what makes prefill page-consistent: a query attends to its earlier
pages exactly as a later decode step will.

On CUDA, batches run the fused kernels through wrapper.DecodeWrapper instead (same semantics,
batched): plan() once per batch from host-side lengths, then per layer
  - decode: one index_put of the new token into its residual row, one store launch for the pages
    this token completes, one decode launch;
  - extend (prefill, chunked and mixed batches; plan built on the device, extend.py): the step's raw
    K/V and the requests' residuals go to a flat scratch, the pages they complete are packed in one
    store launch, the new partial pages go to the residual rows, then one extend kernel
    (csrc/extend.cu) runs every query: a block of tokens x the GQA group per CTA, each packed tile
    dequantized once into shared memory for the whole block, tensor-core MMA, the raw keys causal.
    Page prefill: a query sees its earlier pages packed and its own page raw; chunk prefill: only
    the cached prefix's whole pages packed, the rest raw (the same kernel, another boundary).
The CPU runs the batched torch path (batched.py: one plan per batch, per layer one store and one
dequantization of each needed page for the whole batch).
Set SGLANG_OSCAR_DECODE=torch to force the torch path on CUDA too (e.g. to compare outputs).
"""
from __future__ import annotations

import os

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from . import batched, ops, quant
from .layout import FIELDS


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
        self._setup(pool.oscar, pool, model_runner.req_to_token_pool, model_runner.device,
                    decode_kernels_usable(model_runner.device, pool.oscar, pool.head_dim))

    def _setup(self, cfg, pool, req_to_token_pool, device, use_kernels):
        self.device = torch.device(device)
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = pool
        self.cfg = cfg
        self.use_kernels = use_kernels
        self.forward_metadata = None
        self._decode = None        # CUDA DecodeWrapper, built at the first decode layer (needs Hq/H/D/dtype)
        self._decode_batch = None  # this decode batch's device-side indices, planned lazily
        self._extend_batch = None  # this extend batch's plan (extend.plan_extend)

    @classmethod
    def detached(cls, cfg, pool, req_to_token, device, use_kernels):
        """A backend outside SGLang's model runner, for tests and benchmarks that drive it with fake
        batches: `pool` needs only .layer(i) -> (pages, res_k, res_v); req_to_token [rows, slots]."""
        import types
        be = cls.__new__(cls)
        AttentionBackend.__init__(be)
        be._setup(cfg, pool, types.SimpleNamespace(req_to_token=req_to_token), device, use_kernels)
        return be

    # ---- metadata: host-side lists, once per batch ---------------------------------------------
    def init_forward_metadata(self, fb):
        seq = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        self._decode_batch = self._extend_batch = None
        self._torch_plan = None    # the torch path's batch plan, built at its first layer
        if self.use_kernels and fb.forward_mode.is_decode():
            # Fast path: no per-request lists; the first layer's forward_decode plans the wrapper.
            self.forward_metadata = None
            self._decode_batch = self._prepare_decode(fb.req_pool_indices, fb.seq_lens, seq)
            return
        rows = fb.req_pool_indices.tolist()
        if fb.forward_mode.is_decode():
            ext = [1] * len(rows)
        else:
            ext = list(fb.extend_seq_lens_cpu)
        prefix = [s - e for s, e in zip(seq, ext)]
        self.forward_metadata = (rows, prefix, ext)
        if not fb.forward_mode.is_decode():
            self._check_residual_owners(rows, prefix)
        if self.use_kernels and not fb.forward_mode.is_decode():
            self._extend_batch = self._prepare_extend(rows, prefix, ext, fb.seq_lens.device)

    def _check_residual_owners(self, rows, prefix):
        """An extend whose cached prefix ends inside a page continues from that page's raw tokens in the
        request's residual row, so the row must have been written by this same request since SGLang
        gave it out (its req_generation). SGLang keeps that true: radix matches are page-aligned, a
        retracted request frees everything and resumes from a page-aligned match, chunked prefill keeps
        its row. Anything else (a feature that hands a partial prefix to a fresh row) would read another
        request's stale keys, so it stops here instead."""
        r = torch.tensor(rows, dtype=torch.int64)
        owner = getattr(self, "_res_owner", None)   # per row: the generation that last wrote its residual
        if owner is None:
            owner = self._res_owner = torch.full((self.req_to_token_pool.req_to_token.shape[0],), -1,
                                                 dtype=torch.int64)
        gens = getattr(self.req_to_token_pool, "req_generation", None)
        gen = gens[r].to(torch.int64).cpu() if gens is not None else torch.zeros_like(r)
        bad = (torch.tensor(prefix, dtype=torch.int64) % self.cfg.page_size != 0) & (owner[r] != gen)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0, 0])
            raise RuntimeError(
                f"oscar backend: request row {rows[i]} arrives with a cached prefix of {prefix[i]} tokens, not a "
                f"multiple of the page size {self.cfg.page_size}, but its residual row holds no partial page of "
                "this request (a fresh row); the partial page's raw keys are gone, so this cannot be served")
        owner[r] = gen

    def _prepare_extend(self, rows, prefix, ext, dev) -> dict:
        """Device indices of one extend batch (extend.plan_extend: torch ops over [B] tensors, no
        per-token host loop). The raw scratch it sizes holds the step's tokens plus each request's
        residual, i.e. less than one page per request on top of the step's tokens."""
        from .extend import plan_extend
        t = torch.tensor([rows, prefix, ext], dtype=torch.int64).to(dev, non_blocking=True)
        return plan_extend(t[0], t[1], t[2], prefix, ext, self.cfg.page_size, self.req_to_token_pool.req_to_token)

    def _page_table(self, rows, n_pages: int):
        """int32 [len(rows), max(1, n_pages)] pool page ids of each request row, in one gather: page j is
        slot req_to_token[row, j*P] // P (SGLang allocates pages whole). Columns past a request's own
        pages hold whatever its row has there; the kernels never read them."""
        P = self.cfg.page_size
        req_to_token = self.req_to_token_pool.req_to_token
        cols = torch.arange(max(1, n_pages), device=rows.device, dtype=torch.int64) * P
        cols = torch.clamp(cols, max=req_to_token.shape[1] - 1)
        return (req_to_token[rows[:, None], cols[None, :]] // P).to(torch.int32)

    def _prepare_decode(self, req_pool_indices, seq_lens, seq_cpu: list[int]) -> dict:
        """Device indices of one decode batch (the token at position s-1, s = seq_len incl. it).

        It sees pages 0..(s-1)//P - 1 packed and its own page raw from its residual row, so
        num_pages = (s-1)//P and res_len = s - num_pages*P (1..P). A token with s % P == 0 completes
        its page: that page is packed from the residual row (after the token is written) before the
        decode kernel reads the residual, exactly as the per-request path does.
        """
        P = self.cfg.page_size
        dev = seq_lens.device
        rows = req_pool_indices.to(torch.int64)
        s = seq_lens.to(torch.int64)
        n_pages_cpu = [(x - 1) // P for x in seq_cpu]
        num_pages = (s - 1) // P
        req_to_token = self.req_to_token_pool.req_to_token
        page_table = self._page_table(rows, max(n_pages_cpu, default=0))
        done = [i for i, x in enumerate(seq_cpu) if x % P == 0]
        store = None
        if done:
            idx = torch.tensor(done, dtype=torch.int64, device=dev)
            d_rows = rows[idx]
            # the completed page is page (s-1)//P; its first slot sits at column num_pages * P
            d_pages = req_to_token[d_rows, num_pages[idx] * P].to(torch.int64) // P
            store = (d_rows, d_pages)
        return dict(rows=rows, slot=(s - 1) % P, page_table=page_table, num_pages_cpu=n_pages_cpu,
                    res_len=(s - num_pages * P).to(torch.int32), store=store, planned=False)

    # ---- forward ---------------------------------------------------------------------------
    def _check(self, layer, save_kv_cache):
        if not save_kv_cache:
            raise RuntimeError("the oscar backend must write the KV cache itself (save_kv_cache=False)")
        if layer.is_cross_attention or (layer.logit_cap or 0) > 0 or (layer.sliding_window_size or -1) > -1:
            raise RuntimeError("the oscar backend supports causal self-attention without softcap or sliding window")

    def forward_extend(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        self._check(layer, save_kv_cache)
        if self._extend_batch is not None:
            return self._forward_extend_kernels(q, k, v, layer)
        return self._forward_requests(q, k, v, layer)

    def forward_decode(self, q, k, v, layer, fb, save_kv_cache=True, **kw):
        self._check(layer, save_kv_cache)
        if self._decode_batch is not None:
            return self._forward_decode_kernels(q, k, v, layer)
        return self._forward_requests(q, k, v, layer)

    def _forward_decode_kernels(self, q, k, v, layer):
        Hq, H, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q = q.reshape(-1, Hq, D)
        k = k.reshape(-1, H, D)
        v = v.reshape(-1, H, D)
        b = self._decode_batch
        self._decode = self._planned(self._decode, b, b["rows"], Hq, H, D, q)
        pages, res_k, res_v = self.token_to_kv_pool.layer(layer.layer_id)
        res_k[b["rows"], b["slot"]] = k.to(res_k.dtype)
        res_v[b["rows"], b["slot"]] = v.to(res_v.dtype)
        if b["store"] is not None:
            d_rows, d_pages = b["store"]
            store(res_k[d_rows], res_v[d_rows], d_pages, pages, self.cfg)
        out = self._decode.run(q, pages, res_k, res_v, sm_scale=layer.scaling)
        return out.reshape(-1, Hq * D)

    def _planned(self, w, b, res_rows, Hq, H, D, q):
        """`w`, (re)built for this layer's shapes and planned once per batch `b` (the split schedule
        depends only on the lengths)."""
        if w is None or (w.Hq, w.H, w.D, w.dtype) != (Hq, H, D, q.dtype):
            from .wrapper import DecodeWrapper
            w = DecodeWrapper(self.cfg, Hq, H, D, q.dtype, q.device)
            b["planned"] = False
        if not b["planned"]:
            w.plan(b["page_table"], b["num_pages_cpu"], res_rows, b["res_len"])
            b["planned"] = True
        return w

    def _forward_extend_kernels(self, q, k, v, layer):
        """Both prefill modes: the step's raw tokens into the scratch, the pages it completes packed
        (before any query reads them), the new partial pages to the residual rows, then one extend
        kernel (extend.py / csrc/extend.cu) for every query of the batch."""
        from .extend import fill_scratch, run_extend
        Hq, H, D, P = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, self.cfg.page_size
        b = self._extend_batch
        pages, res_k, res_v = self.token_to_kv_pool.layer(layer.layer_id)
        raw_k, raw_v = fill_scratch(k, v, res_k, res_v, b)
        if b["store"] is not None:
            idx, page_ids = b["store"]
            n = page_ids.shape[0]
            store(raw_k[idx].view(n, P, H, D), raw_v[idx].view(n, P, H, D), page_ids, pages, self.cfg)
        if b["tail"] is not None:
            src, rows, slots = b["tail"]
            res_k[rows, slots] = raw_k[src]
            res_v[rows, slots] = raw_v[src]
        return run_extend(q.reshape(-1, Hq, D), pages, raw_k, raw_v, b, self.cfg, layer.scaling).reshape(-1, Hq * D)

    def _forward_requests(self, q, k, v, layer):
        """The torch path: the whole batch at once (batched.py), planned at the batch's first layer."""
        Hq, H, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        q = q.reshape(-1, Hq, D)
        if self._torch_plan is None:
            rows, prefix, ext = self.forward_metadata
            self._torch_plan = batched.plan(rows, prefix, ext, self.cfg, self.req_to_token_pool.req_to_token,
                                            Hq, H, D)
        pages, res_k, res_v = self.token_to_kv_pool.layer(layer.layer_id)
        out = batched.forward(self._torch_plan, q, k.reshape(-1, H, D), v.reshape(-1, H, D), pages, res_k, res_v,
                              self.cfg, layer.scaling, store)
        return out.to(q.dtype).reshape(-1, Hq * D)

    def support_triton(self):
        return False


def decode_kernels_usable(device, cfg, head_dim: int) -> bool:
    """Whether decode may run on the CUDA kernels (else the per-request torch path)."""
    if os.environ.get("SGLANG_OSCAR_DECODE", "").lower() == "torch":
        return False
    if torch.device(device).type != "cuda" or not cfg.quantized or not ops.available():
        return False
    from .wrapper import KERNEL_HEAD_DIMS, KERNEL_PAGE_SIZES
    return head_dim in KERNEL_HEAD_DIMS and cfg.page_size in KERNEL_PAGE_SIZES
