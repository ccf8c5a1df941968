"""Decode attention and page store over the packed pool: CUDA kernels with their torch twins.

Signatures (the attention backend calls exactly these):

    w = DecodeWrapper(cfg, num_qo_heads, num_kv_heads, head_dim, dtype, device)
    w.plan(page_table, num_pages, res_rows, res_len)        # once per batch (host-side scheduling)
    out = w.run(q, layer_pool, res_k, res_v, sm_scale=None, out=None)  # per layer
    out, lse = w.run(..., return_lse=True)                  # lse [B, Hq] fp32, base 2 (FlashInfer's)
    store_pages(k, v, page_ids, layer_pool, cfg)             # pack full pages into pool pages
    out = decode_reference(q, layer_pool, res_k, res_v, sm_scale, page_table, num_pages,
                           res_rows, res_len, cfg, return_lse=False)  # torch twin of plan + run

Arguments: q [B, Hq, D] raw queries (model dtype, not rotated); layer_pool: dict of the
layout.FIELDS tensors of one layer, each with a leading page axis; page_table int32 [B, max_pages]
(pool page ids of each request's packed pages, in order); num_pages int32 [B]; res_k/res_v
[R, P, H, D] raw partial last pages; res_rows int64 [B] (row of each request in res_k/res_v);
res_len int32 [B] (1..P valid residual tokens, the current one included). The decode query sits at
position num_pages*P + res_len - 1 and sees its packed pages through their packed form and its
residual raw (reference.attend with qb = num_pages*P). Output [B, Hq, D] in the model dtype.
res_len 0 means packed pages only: a chunk prefill's queries over their cached prefix, whose
(out, lse) merge with the chunk's own raw attention (chunk.py).
"""
from __future__ import annotations

import math

import torch

from . import ops, quant
from .config import OscarConfig
from .layout import FIELDS
from .reference import attend

MAX_HEADS_PER_CTA = 8   # query heads sharing one KV head handled by one CTA (MMA N = 8)
MIN_SPLIT_STAGES = 2    # a split streams at least 2 x 128 tokens (amortizes prologue and merge)
KERNEL_HEAD_DIMS = (64, 128)
KERNEL_PAGE_SIZES = (32, 64, 128)


def _host_ints(x) -> list[int]:
    if isinstance(x, torch.Tensor):
        return [int(v) for v in x.detach().to("cpu").tolist()]
    return [int(v) for v in x]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous and 16-byte aligned (the kernels load with vector accesses and check it): a slice
    such as page_ids[first:] or a view of SGLang's index buffers may start mid-vector."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _pool_args(pool: dict):
    return [pool[f] for f in FIELDS]


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
        if self.cuda:
            if head_dim not in KERNEL_HEAD_DIMS:
                raise ValueError(f"the CUDA decode kernel supports head_dim 64 and 128, got {head_dim}")
            if cfg.page_size not in KERNEL_PAGE_SIZES:
                raise ValueError(f"the CUDA decode kernel supports page sizes 32, 64 and 128, got {cfg.page_size}")
        self.q_chunks = -(-(num_qo_heads // num_kv_heads) // MAX_HEADS_PER_CTA)
        self._slots = None
        self._part_o = self._part_lse = None
        self._plan = None
        self._no_lse = torch.empty(0, dtype=torch.float32, device=self.device)

    # ---- scheduling -------------------------------------------------------------------------
    def _wave_slots(self) -> int:
        if self._slots is None:
            ext = ops.load()
            props = torch.cuda.get_device_properties(self.device)
            per_sm = ext.blocks_per_sm(self.D, self.cfg.bits, self.dtype == torch.bfloat16)
            self._slots = props.multi_processor_count * max(1, per_sm)
        return self._slots

    def _split(self, n_pages: list[int], budget: int) -> int:
        """Pages per split: the smallest (a multiple of one stage) whose item count fits one wave."""
        stage = 128 // self.cfg.page_size
        lo = stage * MIN_SPLIT_STAGES
        hi = max(lo, max(n_pages, default=0))
        def items(pps):
            return sum(max(1, -(-n // pps)) for n in n_pages)
        if items(hi) > budget:
            return hi   # enough requests to fill the GPU: one item each
        while lo < hi:
            mid = (lo + hi) // 2
            mid = -(-mid // stage) * stage
            if mid >= hi:
                break
            if items(mid) <= budget:
                hi = mid
            else:
                lo = mid + stage
        return hi

    def plan(self, page_table, num_pages, res_rows, res_len):
        n_pages = _host_ints(num_pages)
        B = len(n_pages)
        self._plan = dict(page_table=page_table, num_pages=num_pages, res_rows=res_rows, res_len=res_len, B=B)
        if not self.cuda:
            return
        stage = 128 // self.cfg.page_size
        budget = max(1, self._wave_slots() // (self.H * self.q_chunks))
        pps = self._split(n_pages, budget)
        items, starts = [], [0]
        for b, n in enumerate(n_pages):
            k = max(1, -(-n // pps))
            size = -(-(-(-n // k)) // stage) * stage if n else 0   # even split, whole stages
            bounds = [min(n, i * size) for i in range(k)] + [n]
            k = sum(1 for i in range(k) if bounds[i] < bounds[i + 1]) or 1
            for i in range(k):
                flags = (1 if i == k - 1 else 0) | (2 if k == 1 else 0)
                items.append((b, bounds[i], bounds[i + 1] if i < k - 1 else n, flags))
            starts.append(len(items))
        dev = self.device
        t_items = torch.tensor(items, dtype=torch.int32).pin_memory().to(dev, non_blocking=True)
        t_starts = torch.tensor(starts, dtype=torch.int32).pin_memory().to(dev, non_blocking=True)
        n_items = len(items)
        any_split = n_items > B
        if any_split and (self._part_o is None or self._part_o.shape[0] < n_items):
            cap = max(n_items, 64)
            self._part_o = torch.empty((cap, self.Hq, self.D), dtype=torch.float32, device=dev)
            self._part_lse = torch.empty((cap, self.Hq), dtype=torch.float32, device=dev)
        if self._part_o is None:
            self._part_o = torch.empty((1, self.Hq, self.D), dtype=torch.float32, device=dev)
            self._part_lse = torch.empty((1, self.Hq), dtype=torch.float32, device=dev)
        self._plan.update(
            items=t_items, item_start=t_starts, n_items=n_items, any_split=any_split, pages_per_split=pps,
            page_table_dev=_aligned(page_table.to(dev, torch.int32)),
            res_rows_dev=_aligned(torch.as_tensor(res_rows, dtype=torch.int64).to(dev)),
            res_len_dev=_aligned(torch.as_tensor(res_len, dtype=torch.int32).to(dev)),
        )

    # ---- launch --------------------------------------------------------------------------------
    def run(self, q, layer_pool: dict, res_k, res_v, sm_scale=None, out=None, return_lse=False):
        if self._plan is None:
            raise RuntimeError("DecodeWrapper.run before plan")
        pl = self._plan
        scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(self.D)
        if not (self.cuda and q.is_cuda):
            return decode_reference(q, layer_pool, res_k, res_v, scale, pl["page_table"], pl["num_pages"],
                                    pl["res_rows"], pl["res_len"], self.cfg, return_lse)
        if q.shape[0] != pl["B"]:
            raise ValueError(f"q has batch {q.shape[0]}, the plan {pl['B']}")
        ext = ops.load()
        out = torch.empty_like(q) if out is None else out
        lse = q.new_empty((q.shape[0], self.Hq), dtype=torch.float32) if return_lse else self._no_lse
        ext.decode(_aligned(q), *_pool_args(layer_pool), pl["page_table_dev"], res_k, res_v,
                   pl["res_rows_dev"], pl["res_len_dev"], pl["items"], pl["item_start"], self._part_o,
                   self._part_lse, out, lse, pl["n_items"], self.q_chunks, float(scale), self.cfg.bits,
                   self.cfg.rotate, pl["any_split"])
        return (out, lse) if return_lse else out


def store_pages(k, v, page_ids, layer_pool: dict, cfg: OscarConfig) -> None:
    """Pack full pages k, v [N, P, H, D] (raw, model dtype) into pool pages page_ids [N], in place."""
    if k.shape[0] == 0:
        return
    if k.is_cuda and ops.available():
        ext = ops.load()
        ids = _aligned(torch.as_tensor(page_ids, device=k.device).to(torch.int64))
        ext.store(_aligned(k), _aligned(v), ids, *_pool_args(layer_pool), cfg.bits, cfg.rotate,
                  cfg.token_norm)
        return
    packed = quant.store_pages(k, v, cfg)
    ids = torch.as_tensor(page_ids, device=layer_pool["k_norm"].device).to(torch.int64)
    for f in FIELDS:
        layer_pool[f][ids] = packed[f]


def decode_reference(q, layer_pool: dict, res_k, res_v, sm_scale, page_table, num_pages, res_rows, res_len,
                     cfg: OscarConfig, return_lse=False):
    """Torch twin of DecodeWrapper.plan + run: one reference.attend call per request."""
    P = cfg.page_size
    n_pages, rows, lens = _host_ints(num_pages), _host_ints(res_rows), _host_ints(res_len)
    out = torch.empty_like(q)
    lse = torch.full((q.shape[0], q.shape[1]), -math.inf, dtype=torch.float32, device=q.device)
    for b, (n, row, rl) in enumerate(zip(n_pages, rows, lens)):
        pages = None
        if n:
            ids = page_table[b, :n].to(layer_pool["k_norm"].device).long()
            pages = {f: layer_pool[f][ids] for f in FIELDS}
        qb = n * P
        if n == 0 and rl == 0:  # nothing visible: the kernel's convention
            out[b] = 0
            continue
        pos = torch.tensor([qb + rl - 1], device=q.device)
        o, l = attend(q[b:b + 1], pos, torch.tensor([qb], device=q.device), pages, res_k[row, :rl],
                      res_v[row, :rl], qb, cfg, sm_scale, return_lse=True)
        out[b] = o[0].to(q.dtype)
        lse[b] = l[0] / math.log(2)   # natural -> base 2
    return (out, lse) if return_lse else out
