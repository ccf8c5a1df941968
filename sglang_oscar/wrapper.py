"""Decode attention and page store over the packed pool: CUDA kernels with their torch twins.

Signatures (the attention backend calls exactly these):

    w = DecodeWrapper(cfg, num_qo_heads, num_kv_heads, head_dim, dtype, device)  # workspace allocated here
    w.plan(pages, num_pages, res_rows, res_len, splits=None)  # per batch: no device work, no host sync
    out = w.run(q, layer_pool, res_k, res_v, sm_scale=None, out=None)       # per layer
    out, lse = w.run(..., return_lse=True)                  # lse [B, Hq] fp32, base 2 (FlashInfer's)
    store_pages(k, v, page_ids, layer_pool, cfg, rows=None)  # pack full pages into pool pages
    out = decode_reference(q, layer_pool, res_k, res_v, sm_scale, pages, num_pages,
                           res_rows, res_len, cfg, return_lse=False)  # torch twin of plan + run

Arguments: q [B, Hq, D] raw queries (model dtype, not rotated); layer_pool: dict of the
layout.FIELDS tensors of one layer, each with a leading page axis; pages: where query b's packed
pages are, either a plain int32 page table [B, max_pages] (pool page ids in order) or a
PageLookup into SGLang's req_to_token (token slots of each request row, read in place, no gather);
num_pages int32 [B]; res_k/res_v [R, P, H, D] raw partial last pages; res_rows int64 [B] (row of
each query in res_k/res_v); res_len int32 [B] (1..P valid residual tokens, the current one
included). The decode query sits at position num_pages*P + res_len - 1 and sees its packed pages
through their packed form and its residual raw (reference.attend with qb = num_pages*P). Output
[B, Hq, D] in the model dtype. res_len 0 means packed pages only: a chunk prefill's queries over
their cached prefix, whose (out, lse) merge with the chunk's own raw attention (chunk.py).
All of plan's tensors stay on the device and are read by the kernel at launch, so a plan over
fixed buffers can be captured in a CUDA graph and replayed with new lengths in them.

Split-KV schedule (static, decided on the device): a batch of B queries gets at most
`splits` = max(1, budget // B) CTAs per (query, KV head, head chunk), budget = the CTAs one wave
of the GPU holds divided by the KV-head x head-chunk CTAs of one query; query b uses
min(splits, ceil(units_b / MIN_SPLIT_STAGES)) of them over whole 128-token units
(split_schedule is the twin of the kernel's split_range).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from . import ops, quant
from .config import OscarConfig
from .layout import FIELDS
from .reference import attend
from .shapes import MAX_HEADS_PER_CTA, kernel_problem

MIN_SPLIT_STAGES = 2    # = kMinSplitStages in csrc/kernels.h
STAGE_TOKENS = 128      # tokens per split unit of the decode kernel (half its shared-memory stage)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels load with vector accesses and check it): a slice
    such as page_ids[first:] or a view of SGLang's index buffers may start mid-vector."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _on(x, dtype, device) -> torch.Tensor:
    """x (a tensor or a host list) as an aligned `dtype` tensor on `device` (lists: one copy there)."""
    return _aligned(torch.as_tensor(x, dtype=dtype).to(device, non_blocking=True))


def _pool_args(pool: dict):
    return [pool[f] for f in FIELDS]


@dataclasses.dataclass
class PageLookup:
    """Query b's page j is pool page table[row_b, j * col_step] >> shift, row_b = rows[b] (or b).

    A plain page table is PageLookup(table); SGLang's req_to_token (one token slot per column,
    pages allocated whole) is PageLookup(req_to_token, req_pool_indices, P, log2 P)."""
    table: torch.Tensor
    rows: torch.Tensor | None = None
    col_step: int = 1
    shift: int = 0

    @classmethod
    def of(cls, pages) -> "PageLookup":
        return pages if isinstance(pages, PageLookup) else cls(pages)

    def ids(self, b: int, n: int) -> torch.Tensor:
        """Pool page ids 0..n-1 of query b (the torch twin of the kernel's lookup)."""
        row = int(self.rows[b]) if self.rows is not None else b
        cols = torch.arange(n, device=self.table.device) * self.col_step
        return (self.table[row, cols].to(torch.int64) >> self.shift)


def split_schedule(num_pages: torch.Tensor, page_size: int, splits: int):
    """Twin of the kernel's split_range: for each query b and split i < splits, its pages
    [first, end) and, per query, the number of splits it uses (count); splits i >= count do nothing.
    Returns (first [B, splits], end [B, splits], count [B]), int64, on num_pages' device."""
    n = num_pages.to(torch.int64)
    pps = STAGE_TOKENS // page_size
    stages = (n + pps - 1) // pps
    k = torch.clamp((stages + MIN_SPLIT_STAGES - 1) // MIN_SPLIT_STAGES, max=splits)
    sps = torch.where(stages > 0, (stages + k - 1) // k.clamp(min=1), torch.zeros_like(stages))
    count = torch.where(stages > 0, (stages + sps - 1) // sps.clamp(min=1), torch.ones_like(stages))
    i = torch.arange(splits, device=n.device)[None, :]
    first = torch.minimum(n[:, None], i * sps[:, None] * pps)
    end = torch.minimum(n[:, None], (i + 1) * sps[:, None] * pps)
    return first, end, count


@dataclasses.dataclass
class _Plan:
    pages: PageLookup
    num_pages: torch.Tensor
    res_rows: torch.Tensor
    res_len: torch.Tensor
    B: int
    splits: int


class DecodeWrapper:
    """FlashInfer-style plan/run for paged split-KV decode over OScaR packed pages."""

    def __init__(self, cfg: OscarConfig, num_qo_heads: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device):
        if not cfg.quantized:
            raise ValueError("DecodeWrapper needs a quantized method (kivi, quarot or oscar)")
        if num_qo_heads % num_kv_heads:
            raise ValueError(f"query heads ({num_qo_heads}) must be a multiple of KV heads ({num_kv_heads})")
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"model dtype must be bfloat16 or float16, got {dtype}")
        self.cfg = cfg
        self.Hq, self.H, self.D = num_qo_heads, num_kv_heads, head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.q_chunks = -(-(num_qo_heads // num_kv_heads) // MAX_HEADS_PER_CTA)
        self.budget = 1
        if self.cuda:
            problem = kernel_problem(cfg.page_size, head_dim, cfg.bits, dtype)
            if problem:
                raise ValueError(f"the CUDA decode kernel does not support {problem}")
            kernels = ops.load()
            per_sm = kernels.blocks_per_sm(head_dim, cfg.bits, dtype == torch.bfloat16)
            slots = torch.cuda.get_device_properties(self.device).multi_processor_count * max(1, per_sm)
            self.budget = max(1, slots // (num_kv_heads * self.q_chunks))
        # Split partials: a batch splits only while B * splits <= budget, so this never grows.
        self.part_o = torch.empty((self.budget, num_qo_heads, head_dim), dtype=torch.float32, device=self.device)
        self.part_lse = torch.empty((self.budget, num_qo_heads), dtype=torch.float32, device=self.device)
        self._plan = None
        self._no_lse = torch.empty(0, dtype=torch.float32, device=self.device)
        self._no_rows = torch.empty(0, dtype=torch.int64, device=self.device)

    def splits_for(self, batch: int) -> int:
        """Most splits per query for a batch of `batch` queries (one wave of CTAs in all)."""
        return max(1, self.budget // max(1, batch))

    def plan(self, pages, num_pages, res_rows, res_len, splits: int | None = None):
        """pages: an int32 page table [B, max_pages] or a PageLookup; num_pages, res_rows, res_len:
        device tensors (or host lists, copied once). Reads nothing back from the device."""
        lookup = PageLookup.of(pages)
        dev = self.device
        num_pages = _on(num_pages, torch.int32, dev)
        B = num_pages.shape[0]
        splits = self.splits_for(B) if splits is None else int(splits)
        if splits < 1 or (splits > 1 and B * splits > self.budget):
            raise ValueError(f"{splits} splits x {B} queries exceed the workspace ({self.budget} partials)")
        if self.cuda:
            lookup = dataclasses.replace(lookup, table=lookup.table if lookup.table.dtype == torch.int32
                                         else lookup.table.to(torch.int32),
                                         rows=None if lookup.rows is None else _on(lookup.rows, torch.int64, dev))
        self._plan = _Plan(pages=lookup, num_pages=num_pages, res_rows=_on(res_rows, torch.int64, dev),
                           res_len=_on(res_len, torch.int32, dev), B=B, splits=splits)

    @property
    def planned_splits(self) -> int:
        return self._plan.splits

    def run(self, q, layer_pool: dict, res_k, res_v, sm_scale=None, out=None, return_lse=False):
        if self._plan is None:
            raise RuntimeError("DecodeWrapper.run before plan")
        pl = self._plan
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(self.D)
        if not (self.cuda and q.is_cuda):
            return decode_reference(q, layer_pool, res_k, res_v, scale, pl.pages, pl.num_pages, pl.res_rows,
                                    pl.res_len, self.cfg, return_lse)
        if q.shape[0] != pl.B:
            raise ValueError(f"q has batch {q.shape[0]}, the plan {pl.B}")
        kernels = ops.load()
        out = torch.empty_like(q) if out is None else out
        lse = q.new_empty((q.shape[0], self.Hq), dtype=torch.float32) if return_lse else self._no_lse
        lk = pl.pages
        kernels.decode(_aligned(q), *_pool_args(layer_pool), lk.table,
                   lk.rows if lk.rows is not None else self._no_rows, lk.col_step, lk.shift, pl.num_pages,
                   res_k, res_v, pl.res_rows, pl.res_len, self.part_o, self.part_lse, out, lse, pl.splits,
                   self.q_chunks, float(scale), self.cfg.bits, self.cfg.rotate)
        return (out, lse) if return_lse else out


def store_pages(k, v, page_ids, layer_pool: dict, cfg: OscarConfig, rows=None, sq=None, tok=None) -> None:
    """Pack full pages into pool pages page_ids [N], in place. k, v: [N, P, H, D] raw (model dtype),
    page n from row n; or, with rows [N], any [R, P, H, D] buffer (e.g. the residual) with page n
    from row rows[n]; or, with tok [N], a token buffer [tokens, H, D] (the extend scratch) with page
    n from the P tokens at tok[n]. A negative page id skips its entry (decided on the device, no host
    sync). sq: fp32 squared token norms over all KV heads, token for token with k (tensor
    parallelism: k holds this rank's heads only); None: the norm is over k's own heads."""
    n = len(page_ids) if rows is None else len(rows)
    if n == 0:
        return
    if k.is_cuda and ops.available(k.device):
        kernels = ops.load()
        ids = _on(page_ids, torch.int64, k.device)
        none = ids.new_empty(0)
        src = _on(rows, torch.int64, k.device) if rows is not None else none
        toks = _on(tok, torch.int64, k.device) if tok is not None else none
        nsq = _aligned(sq) if sq is not None else k.new_empty(0, dtype=torch.float32)
        kernels.store(_aligned(k), _aligned(v), ids, src, toks, *_pool_args(layer_pool), cfg.bits, cfg.rotate,
                      cfg.token_norm, nsq)
        return
    ids = torch.as_tensor(page_ids, device=k.device).to(torch.int64)
    if tok is not None:   # gather the pages out of the token buffer
        P = cfg.page_size
        idx = (torch.as_tensor(tok, device=k.device).to(torch.int64)[:, None] + torch.arange(P, device=k.device))
        k, v = k[idx], v[idx]
        sq = sq[idx] if sq is not None else None
    if rows is not None:
        keep = ids >= 0
        src = torch.as_tensor(rows, device=k.device).to(torch.int64)[keep]
        k, v, ids = k[src], v[src], ids[keep]
        sq = sq[src] if sq is not None else None
        if ids.numel() == 0:
            return
    packed = quant.store_pages(k, v, cfg, sq)
    ids = ids.to(layer_pool["k_norm"].device)
    for f in FIELDS:
        layer_pool[f][ids] = packed[f]


def decode_reference(q, layer_pool: dict, res_k, res_v, sm_scale, pages, num_pages, res_rows, res_len,
                     cfg: OscarConfig, return_lse=False):
    """Torch twin of DecodeWrapper.plan + run: one reference.attend call per query (host loop: the
    spec and the CPU path, not the CUDA one)."""
    P = cfg.page_size
    lookup = PageLookup.of(pages)
    n_pages, rows, lens = (torch.as_tensor(x).tolist() for x in (num_pages, res_rows, res_len))
    out = torch.empty_like(q)
    lse = torch.full((q.shape[0], q.shape[1]), -math.inf, dtype=torch.float32, device=q.device)
    for b, (n, row, rl) in enumerate(zip(n_pages, rows, lens)):
        paged = None
        if n:
            ids = lookup.ids(b, n).to(layer_pool["k_norm"].device)
            paged = {f: layer_pool[f][ids] for f in FIELDS}
        qb = n * P
        if n == 0 and rl == 0:  # nothing visible: the kernel's convention
            out[b] = 0
            continue
        pos = torch.tensor([qb + rl - 1], device=q.device)
        o, l = attend(q[b:b + 1], pos, torch.tensor([qb], device=q.device), paged, res_k[row, :rl],
                      res_v[row, :rl], qb, cfg, sm_scale, return_lse=True)
        out[b] = o[0].to(q.dtype)
        lse[b] = l[0] / math.log(2)   # natural -> base 2
    return (out, lse) if return_lse else out
