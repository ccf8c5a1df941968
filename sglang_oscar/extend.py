"""Extend (prefill) attention over the packed pool: the plan of one batch, the CUDA kernel, its torch twin.

One step of a request (prefix cached tokens, ext new ones, base = prefix // P * P) lays its raw tokens
out in a flat scratch [N, H, D]: its residual (positions base .. prefix-1), then its new tokens, from
row raw_off. So the scratch holds the step's tokens plus less than one page per request. Of these, the
pages the step completes are packed into the pool (before any query reads them) and the new partial
page goes back to the request's residual row. A query at position p then sees keys [0, qb) through
their packed pages and keys [qb, p] raw from the scratch, with qb = (p // P) * P (page prefill) or
(prefix // P) * P (chunk prefill): csrc/extend.cu, one kernel for both modes.

    plan = plan_extend(rows, prefix, ext, prefix_cpu, ext_cpu, P, req_to_token)   # once per batch
    out = run_extend(q, layer_pool, raw_k, raw_v, plan, cfg, sm_scale)            # per layer
    out, lse = run_extend(..., return_lse=True)                                   # lse base 2

The plan is built on the device from SGLang's tensors (no per-token host loops, no page table: the
kernel looks pages up in req_to_token as req_to_token[row, j*P] // P); `plan_reference` is the
plain-loop spec it is tested against, and `extend_reference` the kernel's torch twin.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, NamedTuple

import torch

from . import ops
from .config import OscarConfig
from .layout import FIELDS
from .reference import attend, boundaries
from .wrapper import _aligned

if TYPE_CHECKING:   # flash.py imports this module
    from .flash import FlashPlan

ROWS = (128, 64)   # the kernel's MMA rows per CTA: (token, query head) pairs of one KV head
WAVE_CTAS = 2      # 128-row CTAs (one per SM) only when they fill at least this many waves
MAX_SPLITS = 32    # = kMaxExtendSplits in csrc/kernels.h
SPLIT_TILES = 8    # a key split streams at least this many 64-key tiles (amortizes its queries and merge)
SPLIT_COST = 2     # a split's fixed cost (queries in, partial out) in tile times, for key_splits' makespan


def segments(lens: torch.Tensor, total: int):
    """(segment id, offset in segment) of each of the `total` = sum(lens) elements, on lens' device."""
    dev = lens.device
    seg = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens, output_size=total)
    starts = torch.cumsum(lens, 0) - lens
    return seg, torch.arange(total, device=dev) - starts[seg]


class Blocks(NamedTuple):
    """The extend kernel's grid for one GQA group size: MMA rows per CTA, query tokens per block, each
    request's first block (int32 [B + 1], device), the block count and the key splits per block."""
    rows: int
    tok_per_blk: int
    start: torch.Tensor
    count: int
    splits: int


@dataclasses.dataclass
class ExtendPlan:
    """One extend batch: device indices built once (plan_extend), read by every layer.

    Scratch: n_raw tokens; dst_new [T] the scratch index of each new token; res (row, slot, scratch
    index) of the residual tokens re-read, store (first scratch token [N], pool page ids [N]) of the
    pages the step completes, tail (scratch index, row, slot) of the new partial pages, each None when
    empty; src [n_raw] each scratch token's source for the copy kernel (t >= 0: new token t, else
    -1 - (row * P + slot) in the residual rows) and tail_dst [L] = row * P + slot of each tail token.
    info int32 [B, 8] per request (q_start, ext, prefix, raw_off, row, 0, 0, 0) for the kernel."""
    P: int
    n_raw: int
    dst_new: torch.Tensor
    res: tuple | None
    store: tuple | None
    tail: tuple | None
    src: torch.Tensor
    tail_dst: torch.Tensor | None
    info: torch.Tensor
    ext: torch.Tensor              # int64 [B], device
    rows: torch.Tensor             # int64 [B], device (req_pool_indices)
    ext_cpu: list
    prefix_cpu: list
    req_to_token: torch.Tensor
    use_flash: bool | None = None  # the flash path (None: flash.fits decides at the first layer)
    splits: int | None = None      # key splits forced (None: key_splits decides)
    flash: FlashPlan | None = None  # flash.plan_flash's indices, built where the flash path serves
    blocks: dict = dataclasses.field(default_factory=dict)   # GQA group size -> Blocks
    part: dict = dataclasses.field(default_factory=dict)     # the split partials, reused by every layer


def plan_extend(rows, prefix, ext, prefix_cpu, ext_cpu, P: int, req_to_token, use_flash=None) -> ExtendPlan:
    """Device indices of one extend batch. rows/prefix/ext: [B] tensors on the batch's device;
    prefix_cpu/ext_cpu: the same as host lists (their sums size the index tensors without a sync).
    use_flash: run the step through flash.py (None: where flash.fits says it pays)."""
    dev = req_to_token.device
    rows, prefix, ext = (torch.as_tensor(x, device=dev).to(torch.int64) for x in (rows, prefix, ext))
    seq = prefix + ext
    base = prefix // P * P
    r = prefix - base                       # residual tokens the step re-reads
    first, full = prefix // P, seq // P     # pages [first, full) are completed by this step
    n_raw = r + ext
    raw_off = torch.cumsum(n_raw, 0) - n_raw
    seq_cpu = [a + b for a, b in zip(prefix_cpu, ext_cpu)]
    T = sum(ext_cpu)
    R = sum(a % P for a in prefix_cpu)
    N = sum(s // P - a // P for s, a in zip(seq_cpu, prefix_cpu))
    L = sum(s % P for s in seq_cpu)

    seg, off = segments(ext, T)
    dst_new = raw_off[seg] + r[seg] + off
    src = torch.empty(R + T, dtype=torch.int64, device=dev)
    src[dst_new] = torch.arange(T, device=dev)
    res = None
    if R:
        seg, off = segments(r, R)
        res = (rows[seg], off, raw_off[seg] + off)           # residual row, slot -> scratch index
        src[res[2]] = -1 - (res[0] * P + off)
    store = None
    if N:
        seg, off = segments(full - first, N)
        page_ids = (req_to_token[rows[seg], (first[seg] + off) * P] // P).to(torch.int64)
        store = (raw_off[seg] + off * P, page_ids)
    tail = tail_dst = None
    if L:
        seg, off = segments(seq - full * P, L)
        tail = (raw_off[seg] + (full - first)[seg] * P + off, rows[seg], off)  # scratch -> residual row, slot
        tail_dst = tail[1] * P + off
    q_start = torch.cumsum(ext, 0) - ext
    zero = torch.zeros_like(rows)
    info = torch.stack([q_start, ext, prefix, raw_off, rows, zero, zero, zero], 1).to(torch.int32)
    return ExtendPlan(P=P, n_raw=R + T, dst_new=dst_new, res=res, store=store, tail=tail, src=src,
                      tail_dst=tail_dst, info=info, ext=ext,
                      rows=rows, ext_cpu=list(ext_cpu), prefix_cpu=list(prefix_cpu), req_to_token=req_to_token,
                      use_flash=use_flash)


def plan_reference(rows, prefix_cpu, ext_cpu, P: int, req_to_token) -> dict:
    """The spec of plan_extend's index tensors, by plain loops over requests and tokens."""
    dst_new, res, store_tok, page_ids, tail, info = [], [], [], [], [], []
    off = q = 0
    for row, pre, e in zip(rows, prefix_cpu, ext_cpu):
        seq, base = pre + e, pre // P * P
        info.append([q, e, pre, off, row, 0, 0, 0])
        res += [(row, j, off + j) for j in range(pre - base)]
        dst_new += [off + pre - base + t for t in range(e)]
        for pg in range(pre // P, seq // P):
            store_tok.append(off + (pg - pre // P) * P)
            page_ids.append(int(req_to_token[row, pg * P]) // P)
        tail += [(off + (seq // P - pre // P) * P + j, row, j) for j in range(seq % P)]
        off += seq - base
        q += e
    return dict(n_raw=off, dst_new=dst_new, res=res, store=(store_tok, page_ids), tail=tail, info=info)


def fill_scratch(k, v, res_k, res_v, plan):
    """The step's raw scratch [n_raw, H, D] (res dtype): residual tokens, then new ones, per request
    (the torch twin of scratch()). Any per-token tensor goes the same way: res [R, P, *item] and new
    [T, *item] give [n_raw, *item] (v, res_v None: k's alone, e.g. the squared key norms)."""
    item = res_k.shape[2:]
    out = []
    for new, res in ((k, res_k), (v, res_v)):
        if res is None:
            continue
        raw = res.new_empty((plan.n_raw, *item))
        raw[plan.dst_new] = new.reshape(-1, *item).to(res.dtype)
        if plan.res is not None:
            row, slot, dst = plan.res
            raw[dst] = res[row, slot]
        out.append(raw)
    return out


def write_tail(raw_k, raw_v, res_k, res_v, plan) -> None:
    """The new partial pages from the scratch to the residual rows (torch twin of scratch_tail())."""
    if plan.tail is not None:
        src, rows, slots = plan.tail
        res_k[rows, slots] = raw_k[src]
        res_v[rows, slots] = raw_v[src]


def _token_rows(x, H: int, D: int, dtype):
    """x as [T, H, D] rows the copy kernel reads in place (unit stride inside a row, 16-byte aligned
    rows: a view into the fused qkv projection qualifies), else a contiguous copy."""
    x = x.reshape(-1, H, D).to(dtype)
    ok = (x.stride(2) == 1 and x.stride(1) == D and (x.stride(0) * x.element_size()) % 16 == 0
          and x.data_ptr() % 16 == 0)
    return x if ok else x.contiguous()


def scratch(k, v, res_k, res_v, plan):
    """fill_scratch on the CUDA kernels: K and V in one copy launch."""
    if not (res_k.is_cuda and ops.available(res_k.device)):
        return fill_scratch(k, v, res_k, res_v, plan)
    H, D = res_k.shape[2], res_k.shape[3]
    raw_k = res_k.new_empty((plan.n_raw, H, D))
    raw_v = torch.empty_like(raw_k)
    none = plan.src[:0]
    ops.load().copy_rows(raw_k, raw_v, none, _token_rows(k, H, D, res_k.dtype), _token_rows(v, H, D, res_v.dtype),
                         res_k, res_v, plan.src)
    return raw_k, raw_v


def scratch_tail(raw_k, raw_v, res_k, res_v, plan) -> None:
    """write_tail on the CUDA kernels: K and V in one copy launch."""
    if plan.tail is None:
        return
    if not (res_k.is_cuda and ops.available(res_k.device)):
        write_tail(raw_k, raw_v, res_k, res_v, plan)
        return
    empty = raw_k[:0]
    ops.load().copy_rows(res_k, res_v, plan.tail_dst, raw_k, raw_v, empty, empty, plan.tail[0])


_SMS = {}
_MAX_ROWS = {}


def key_splits(count: int, H: int, rows: int, sms: int, longest: int) -> int:
    """Key splits per query block when the step's count x H blocks leave SMs idle (a chat turn's short
    chunk over a long cached prefix): the split count with the shortest makespan, waves x (tiles per
    split + SPLIT_COST), over runs of at least SPLIT_TILES 64-key tiles of the longest request. Counting
    waves matters: 5 splits of 64 blocks are 320 CTAs, a second wave of 56 on 264 slots (64-row CTAs run
    two per SM), slower than 4 splits in one wave."""
    ctas = count * H
    wave = sms * (2 if rows == 64 else 1)
    if ctas >= wave:
        return 1
    tiles = -(-longest // 64)
    top = max(1, min(MAX_SPLITS, tiles // SPLIT_TILES))
    return min(range(1, top + 1), key=lambda s: (-(-ctas * s // wave) * (-(-tiles // s) + SPLIT_COST), s))


def grid(ext_cpu, prefix_cpu, g: int, H: int, sms: int, max_rows: int, splits: int | None = None):
    """(rows per CTA, query tokens per block, block count, key splits) of a step: 128 rows per CTA halve
    the dequantization per query, 64 fill the GPU when the batch is small (and are all a GPU with 99 KB
    of shared memory per CTA can run at head_dim 128); key splits fill it when even 64-row blocks are
    too few (a chat turn's short chunk over a long cached prefix)."""
    for rows in [r for r in ROWS if r <= max_rows]:
        tb = rows // g
        count = sum(-(-e // tb) for e in ext_cpu)
        if tb and count * H >= WAVE_CTAS * sms:
            break
    longest = max(a + e for a, e in zip(prefix_cpu, ext_cpu))
    return rows, tb, count, splits or key_splits(count, H, rows, sms, longest)


def partials_bytes(T: int, Hq: int, D: int, splits: int) -> int:
    """Device bytes of a step's split partials (fp32 out and lse per split), 0 without splits. Splits
    happen only when the step's blocks fill less than a wave, so this stays below
    MAX_SPLITS * sms * 2 * 64 * (D + 1) * 4 bytes (277 MB at D=128 on 132 SMs) whatever the chunk."""
    return splits * T * Hq * (D + 1) * 4 if splits > 1 else 0


def _blocks(plan: ExtendPlan, g: int, H: int, D: int, bits: int) -> Blocks:
    """The plan's query blocks for g query heads per KV head (grid() on this device), built once."""
    if g not in plan.blocks:
        dev = plan.ext.device
        if dev not in _SMS:
            _SMS[dev] = torch.cuda.get_device_properties(dev).multi_processor_count
        if (dev, D, bits) not in _MAX_ROWS:
            with torch.cuda.device(dev):
                _MAX_ROWS[dev, D, bits] = ops.load().extend_max_rows(D, bits)
        rows, tb, count, splits = grid(plan.ext_cpu, plan.prefix_cpu, g, H, _SMS[dev], _MAX_ROWS[dev, D, bits],
                                       plan.splits)
        nb = (plan.ext + tb - 1) // tb
        start = torch.cat([nb.new_zeros(1), torch.cumsum(nb, 0)]).to(torch.int32)
        plan.blocks[g] = Blocks(rows, tb, start, count, splits)
    return plan.blocks[g]


def _flash_serves(plan, cfg: OscarConfig, H: int, D: int) -> bool:
    """Whether this step runs through flash.py (its plan built at the step's first layer)."""
    from . import flash
    use = plan.use_flash
    if use is None:
        use = plan.use_flash = flash.fits(plan, H, D)
    if use and plan.flash is None:
        plan.flash = flash.plan_flash(plan, cfg)
    return bool(use)


def kernel_usable(q) -> bool:
    return q.is_cuda and ops.available()


def run_extend(q, layer_pool: dict, raw_k, raw_v, plan, cfg: OscarConfig, sm_scale=None, return_lse=False, out=None,
               lse=None):
    """Attention of the step's queries q [T, Hq, D] (raw, model dtype) -> out [T, Hq, D] (+ lse [T, Hq],
    base 2). The pages the step completes must already be packed. out / lse: optional destinations."""
    Hq, D = q.shape[1], q.shape[2]
    H = raw_k.shape[1]
    if Hq % H or Hq // H > min(ROWS):
        raise ValueError(f"query heads ({Hq}) must be a multiple of KV heads ({H}), at most {min(ROWS)} per KV head")
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    if not kernel_usable(q):
        return extend_reference(q, layer_pool, raw_k, raw_v, plan, cfg, scale, return_lse)
    if _flash_serves(plan, cfg, H, D):
        from .flash import run_flash
        out, lse = run_flash(q, layer_pool, raw_k, raw_v, plan, cfg, scale, out, lse)
        return (out, lse) if return_lse else out
    rows, tb, blk_start, n_blocks, splits = _blocks(plan, Hq // H, H, D, cfg.bits)
    out = torch.empty_like(q) if out is None else out
    if lse is None:
        lse = q.new_empty((q.shape[0], Hq) if return_lse else 0, dtype=torch.float32)
    T = q.shape[0]
    part = plan.part
    if splits > 1 and (splits, T, Hq, D) not in part:   # once per step, reused by every layer
        part[splits, T, Hq, D] = (torch.empty((splits, T, Hq, D), dtype=torch.float32, device=q.device),
                                  torch.empty((splits, T, Hq), dtype=torch.float32, device=q.device))
    po, pl = part.get((splits, T, Hq, D), (lse[:0], lse[:0]))
    ops.load().extend(_aligned(q), *[layer_pool[f] for f in FIELDS], plan.req_to_token, raw_k, raw_v,
                      plan.info, blk_start, out, lse, n_blocks, rows, tb, float(scale), cfg.bits, cfg.rotate,
                      cfg.prefill == "chunk", splits, po, pl)
    return (out, lse) if return_lse else out


def extend_reference(q, layer_pool: dict, raw_k, raw_v, plan, cfg: OscarConfig, sm_scale, return_lse=False):
    """Torch twin of the kernel: reference.attend per request over its packed pages and scratch tokens."""
    P = plan.P
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    info = plan.info.tolist()
    for q0, e, pre, off, row, *_ in info:
        if not e:
            continue
        base = pre // P * P
        q_pos = torch.arange(pre, pre + e, device=q.device)
        qb = boundaries(q_pos, pre, cfg)
        need = int(qb.max()) // P
        pages = None
        if need:
            cols = torch.arange(need, device=plan.req_to_token.device) * P
            ids = (plan.req_to_token[row, cols] // P).long().to(layer_pool["k_norm"].device)
            pages = {f: layer_pool[f][ids] for f in FIELDS}
        n = pre - base + e
        o, l = attend(q[q0:q0 + e], q_pos, qb, pages, raw_k[off:off + n], raw_v[off:off + n], base, cfg, sm_scale,
                      return_lse=True)
        out[q0:q0 + e] = o.to(q.dtype)
        lse[q0:q0 + e] = l / math.log(2)
    return (out, lse) if return_lse else out
