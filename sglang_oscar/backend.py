"""The `oscar` attention backend: attention over the packed pool, packing pages as they fill.

Per request and layer, one step (prefill chunk, mixed chunk or decode token) does:
  1. raw = the request's residual (its partial last page) + this step's raw K/V;
  2. every page that raw completes is packed into the pool (quant.store_pages / the CUDA store);
  3. the new partial page goes back to the residual row;
  4. attention: each query sees earlier pages through their packed form and the rest raw
     (reference.attend is the spec; batched.py runs it for the whole batch at once on the torch path).
Packing before attention is what makes prefill page-consistent: a query attends to its earlier
pages exactly as a later decode step will.

On CUDA, batches run the fused kernels instead (same semantics, batched):
  - decode (wrapper.DecodeWrapper): a DecodeBatch of device indices derived from SGLang's own
    seq_lens / req_pool_indices by a few torch ops (no host data, no per-request loop), then per
    layer one index_put of the new token into its residual row, one store launch that packs the
    page each completing request fills (the others skip on the device) and one decode launch that
    reads page ids straight from req_to_token. Under SGLang's decode CUDA graphs the indices live in
    buffers allocated once for the largest batch (init_cuda_graph_state), filled inside the graph
    (init_forward_metadata_in_graph), so a replay needs nothing from the host; padded lanes (request
    row 0, seq_len 1) attend to one raw token of the padding row and store nothing.
  - extend (prefill, chunked and mixed batches; plan built on the device, extend.py): the step's raw
    K/V and the requests' residuals go to a flat scratch (one copy launch), the pages they complete
    are packed from it in one store launch, the new partial pages go to the residual rows (one copy
    launch), then one extend kernel
    (csrc/extend.cu) runs every query: a block of tokens x the GQA group per CTA, each packed tile
    dequantized once into shared memory for the whole block, tensor-core MMA, the raw keys causal.
    Page prefill: a query sees its earlier pages packed and its own page raw; chunk prefill: only
    the cached prefix's whole pages packed, the rest raw (the same kernel, another boundary).
The CPU runs the batched torch path (batched.py: one plan per batch, per layer one store and one
dequantization of each needed page for the whole batch).
Set SGLANG_OSCAR_DECODE=torch to force the torch path on CUDA too (e.g. to compare outputs).
"""
from __future__ import annotations

import dataclasses
import logging

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend

from . import batched, ops, quant
from .layout import FIELDS
from .wrapper import store_pages

logger = logging.getLogger(__name__)


def store(k, v, page_ids, pages, cfg, sq=None):
    """Pack full pages k, v [N, P, H, D] into pool pages `page_ids` [N] (sq [N, P]: squared token
    norms over all KV heads, under tensor parallelism)."""
    if k.is_cuda:
        store_pages(k, v, page_ids, pages, cfg, sq=sq)
        return
    packed = quant.store_pages(k, v, cfg, sq)
    for f in FIELDS:
        pages[f][page_ids] = packed[f]


@dataclasses.dataclass
class DecodeBatch:
    """Device indices of one decode batch (the token at position s-1, s = seq_len including it).

    It sees pages 0..(s-1)//P - 1 packed and its own page raw from its residual row, so
    num_pages = (s-1)//P and res_len = s - num_pages*P (1..P). A token with s % P == 0 completes
    its page: that page is packed from the residual row (after the token is written) before the
    decode kernel reads the residual, exactly as the per-request path does."""
    rows: torch.Tensor         # int64 [B] request rows (req_pool_indices)
    slot: torch.Tensor         # int64 [B] the new token's slot in its residual row, (s-1) % P
    num_pages: torch.Tensor    # int32 [B]
    res_len: torch.Tensor      # int32 [B]
    store_page: torch.Tensor   # int64 [B] pool page this token completes, or -1
    splits: int                # the decode kernel's most splits per request for this batch size

    @classmethod
    def empty(cls, bs: int, device) -> "DecodeBatch":
        def z(dtype):   # every entry is written by fill() before anything reads it
            return torch.empty(bs, dtype=dtype, device=device)
        return cls(z(torch.int64), z(torch.int64), z(torch.int32), z(torch.int32), z(torch.int64), 1)

    def view(self, bs: int, splits: int) -> "DecodeBatch":
        """The first bs entries (same storage: a graph captured on them reads what is filled later)."""
        return DecodeBatch(self.rows[:bs], self.slot[:bs], self.num_pages[:bs], self.res_len[:bs],
                           self.store_page[:bs], splits)

    def fill(self, req_pool_indices, seq_lens, req_to_token, page_size: int) -> None:
        """In place, from SGLang's tensors: static shapes, device ops only (graph-recordable)."""
        P, bs = page_size, self.rows.shape[0]
        s = seq_lens[:bs].to(torch.int64)
        n = torch.div(s - 1, P, rounding_mode="floor")
        self.rows.copy_(req_pool_indices[:bs])
        self.slot.copy_(s - 1 - n * P)
        self.num_pages.copy_(n)
        self.res_len.copy_(s - n * P)
        # the completed page is page n; its first slot sits at column n * P of the request's row
        first_slot = req_to_token[self.rows, (n * P).clamp(max=req_to_token.shape[1] - 1)].to(torch.int64)
        self.store_page.copy_(torch.where(s % P == 0, first_slot // P, torch.full_like(s, -1)))


class OscarAttnBackend(AttentionBackend):
    def __init__(self, model_runner):
        super().__init__()
        from .pool import OscarKVPool

        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, OscarKVPool):
            raise RuntimeError(f"the oscar backend needs the OScaR KV pool, got {type(pool).__name__} "
                               "(the plugin's pool hook did not take effect)")
        from sglang.srt.runtime_context import get_parallel
        par = get_parallel()
        mc, tp = model_runner.model_config, par.attn_tp_size
        heads = (mc.num_attention_heads // tp, mc.get_num_kv_heads(tp), pool.head_dim, model_runner.dtype)
        use_kernels = decode_kernels_usable(model_runner.device, pool.oscar, pool.head_dim)
        self._setup(pool.oscar, pool, model_runner.req_to_token_pool, model_runner.device, use_kernels, heads)
        if tp > 1 and pool.oscar.token_norm:
            if not use_kernels:
                raise RuntimeError("oscar: tensor parallelism needs the CUDA kernels (the torch path serves one rank)")
            # The omni-token norm spans all KV heads and a rank holds some: ranks add up their heads'
            # squared norms (heads replicated when tp > KV heads would otherwise count more than once).
            if pool.res_sq is None:
                raise RuntimeError("oscar: the pool was built without the residual's key norms that "
                                   f"tensor parallelism (attn_tp_size {tp}) needs")
            self._norm_group = par.attn_tp_group
            self._norm_scale = mc.get_total_num_kv_heads() / (mc.get_num_kv_heads(tp) * tp)

    def _setup(self, cfg, pool, req_to_token_pool, device, use_kernels, heads=None):
        self.device = torch.device(device)
        self.req_to_token_pool = req_to_token_pool
        self.token_to_kv_pool = pool
        self.cfg = cfg
        self.use_kernels = use_kernels
        self.forward_metadata = None
        self._decode = None        # CUDA DecodeWrapper (built here when the head shapes are known)
        self._decode_batch = None  # this decode batch's DecodeBatch
        self._decode_planned = None  # the DecodeBatch the wrapper is planned for
        self._graph_batch = None   # DecodeBatch buffers for the largest CUDA-graph batch
        if use_kernels and heads is not None:
            self._decode = self._decode_wrapper(*heads)
        self._extend_batch = None  # this extend batch's plan (extend.plan_extend)
        self._norm_group = None    # tensor parallelism: the group whose ranks hold the other KV heads
        self._norm_scale = 1.0

    @classmethod
    def detached(cls, cfg, pool, req_to_token, device, use_kernels, heads=None):
        """A backend outside SGLang's model runner, for tests and benchmarks that drive it with fake
        batches: `pool` needs only .layer(i) -> (pages, res_k, res_v); req_to_token [rows, slots];
        heads = (q heads, kv heads, head_dim, dtype) (needed for CUDA graphs, else found at the
        first decode layer)."""
        import types
        be = cls.__new__(cls)
        AttentionBackend.__init__(be)
        be._setup(cfg, pool, types.SimpleNamespace(req_to_token=req_to_token), device, use_kernels, heads)
        return be

    def _decode_wrapper(self, Hq, H, D, dtype):
        from .wrapper import DecodeWrapper
        return DecodeWrapper(self.cfg, Hq, H, D, dtype, self.device)

    # ---- decode CUDA graphs (SGLang's decode graph runner) -----------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int):
        if not self.use_kernels or self._decode is None:
            raise RuntimeError("oscar: decode CUDA graphs need the CUDA kernels, which this GPU/model cannot use; "
                               "run with --cuda-graph-backend-decode disabled")
        self._graph_batch = DecodeBatch.empty(max_bs, self.device)

    def get_cuda_graph_seq_len_fill_value(self):
        # A padded lane is a request of one token in the padding row 0: no packed page, nothing stored.
        return 1

    def init_forward_metadata_out_graph(self, fb, in_capture: bool = False):
        """Capture and replay of a decode graph (host-only: views of the graph buffers, the split
        count of this batch size; the values are filled inside the graph)."""
        if not fb.forward_mode.is_decode_or_idle():
            raise RuntimeError("oscar: only decode runs under CUDA graphs (prefill graphs must be disabled)")
        bs = fb.req_pool_indices.shape[0]
        self._extend_batch = self.forward_metadata = None
        self._decode_batch = self._graph_batch.view(bs, self._decode.splits_for(bs))

    def init_forward_metadata_in_graph(self, fb):
        if self._decode_batch is not None:
            self._decode_batch.fill(fb.req_pool_indices, fb.seq_lens, self.req_to_token_pool.req_to_token,
                                    self.cfg.page_size)

    # ---- metadata: host-side lists, once per batch ---------------------------------------------
    def init_forward_metadata(self, fb):
        """Eager batches (decode batches outside the captured sizes, every prefill)."""
        self._decode_batch = self._extend_batch = None
        self._torch_plan = None    # the torch path's batch plan, built at its first layer
        if self.use_kernels and fb.forward_mode.is_decode():
            # Kernel path: device indices only (no host data); the wrapper is planned at the first layer.
            self.forward_metadata = None
            bs = fb.req_pool_indices.shape[0]
            db = self._decode_batch = DecodeBatch.empty(bs, self.device)
            if self._decode is not None:
                db.splits = self._decode.splits_for(bs)
            db.fill(fb.req_pool_indices, fb.seq_lens, self.req_to_token_pool.req_to_token, self.cfg.page_size)
            return
        seq = fb.seq_lens_cpu.tolist() if fb.seq_lens_cpu is not None else fb.seq_lens.tolist()
        rows = fb.req_pool_indices.tolist()
        if fb.forward_mode.is_decode():
            extend_lens = [1] * len(rows)
        else:
            extend_lens = list(fb.extend_seq_lens_cpu)
        prefix = [s - e for s, e in zip(seq, extend_lens)]
        self.forward_metadata = (rows, prefix, extend_lens)
        if not fb.forward_mode.is_decode():
            self._check_residual_owners(rows, prefix)
        if self.use_kernels and not fb.forward_mode.is_decode():
            self._extend_batch = self._prepare_extend(rows, prefix, extend_lens, fb.seq_lens.device)

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

    # ---- forward ---------------------------------------------------------------------------
    def _full_norm_sq(self, k):
        """Under tensor parallelism: fp32 [T] squared norms of keys k [T, H, D] over all KV heads
        of the model, summed across the ranks (None without tensor parallelism: the store sums)."""
        if self._norm_group is None:
            return None
        sq = self._norm_group.all_reduce(quant.norm_sq(k))
        return sq * self._norm_scale if self._norm_scale != 1.0 else sq

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
        db = self._decode_batch
        w = self._decode
        if w is None or (w.Hq, w.H, w.D, w.dtype) != (Hq, H, D, q.dtype):
            w = self._decode = self._decode_wrapper(Hq, H, D, q.dtype)
            db.splits = w.splits_for(db.rows.shape[0])
            self._decode_planned = None
        if self._decode_planned is not db:   # once per batch: host-only (tensor handles, split count)
            from .wrapper import PageLookup
            P = self.cfg.page_size
            pages_of = PageLookup(self.req_to_token_pool.req_to_token, db.rows, P, P.bit_length() - 1)
            w.plan(pages_of, db.num_pages, db.rows, db.res_len, splits=db.splits)
            self._decode_planned = db
        pages, res_k, res_v = self.token_to_kv_pool.layer(layer.layer_id)
        res_k[db.rows, db.slot] = k.to(res_k.dtype)
        res_v[db.rows, db.slot] = v.to(res_v.dtype)
        res_sq = None
        sq = self._full_norm_sq(k)
        if sq is not None:
            res_sq = self.token_to_kv_pool.layer_norm_sq(layer.layer_id)
            res_sq[db.rows, db.slot] = sq
        # one launch for the batch: requests whose token completes no page have store_page -1
        store_pages(res_k, res_v, db.store_page, pages, self.cfg, rows=db.rows, sq=res_sq)
        out = w.run(q, pages, res_k, res_v, sm_scale=layer.scaling)
        return out.reshape(-1, Hq * D)

    def _forward_extend_kernels(self, q, k, v, layer):
        """Both prefill modes: the step's raw tokens into the scratch, the pages it completes packed
        (before any query reads them), the new partial pages to the residual rows, then one extend
        kernel (extend.py / csrc/extend.cu) for every query of the batch."""
        from .extend import fill_scratch, run_extend, scratch, scratch_tail
        Hq, H, D = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim
        b = self._extend_batch
        pages, res_k, res_v = self.token_to_kv_pool.layer(layer.layer_id)
        raw_k, raw_v = scratch(k, v, res_k, res_v, b)
        raw_sq = res_sq = None
        sq = self._full_norm_sq(k.reshape(-1, H, D))
        if sq is not None:   # the squared norms travel with the raw keys: scratch, then residual
            res_sq = self.token_to_kv_pool.layer_norm_sq(layer.layer_id)
            (raw_sq,) = fill_scratch(sq, None, res_sq, None, b)
        if b.store is not None:   # the completed pages straight from the scratch
            start, page_ids = b.store
            store_pages(raw_k, raw_v, page_ids, pages, self.cfg, sq=raw_sq, tok=start)
        scratch_tail(raw_k, raw_v, res_k, res_v, b)
        if raw_sq is not None and b.tail is not None:
            src, rows, slots = b.tail
            res_sq[rows, slots] = raw_sq[src]
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


_fallback_warned = False


def decode_kernels_usable(device, cfg, head_dim: int) -> bool:
    """Whether attention may run on the CUDA kernels (else the torch path). On a CUDA device the
    kernels cannot serve (another GPU architecture, a shape outside shapes.py's matrix) it says so
    once per process."""
    global _fallback_warned
    if torch.device(device).type != "cuda" or not cfg.quantized:
        return False
    problem = ops.torch_path_reason(cfg, head_dim, device)
    if problem is None:
        return True
    if problem.startswith("SGLANG_OSCAR_DECODE"):
        return False   # asked for: nothing to warn about
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning("oscar: the CUDA kernels do not support %s; attention runs on the torch path "
                       "(much slower, no decode CUDA graphs)", problem)
    return False
