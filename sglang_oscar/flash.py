"""Large prefills through FlashAttention over dequantized pages (the extend kernel's fast path for big chunks).

A chunk of many queries is bound by its FLOPs, not by the bytes of its keys. So for a large step the
packed pages its queries read are dequantized once per layer into a model-dtype scratch
(csrc/dequant.cu), and FlashAttention's variable-length kernel (torch's `_flash_attention_forward`)
runs the attention, in parts whose states are merged by their log-sum-exp (csrc/dequant.cu, merge).
The semantics are extend.py's: a query at position p sees keys below qb through their packed pages
and keys qb..p raw, qb = P * (p // P) (page prefill) or P * (prefix // P) (chunk prefill).

  chunk prefill: (1) every query of a request over its cached prefix's pages (dequantized, all visible);
                 (2) over the request's raw tokens, causal.
  page prefill:  (1) query blocks of BLOCK tokens, aligned to absolute positions, over the dequantized
                 keys below the block (all visible; BLOCK is FlashAttention's query tile, so no tile
                 runs half empty); (2) each query page over the dequantized pages of its block below
                 it; (3) each query page over its own raw tokens, causal.
The sequences of a part may overlap in the key scratch: sequence i reads keys cu_k[i] .. cu_k[i] +
used[i] (FlashAttention's seqused_k). Queries meet dequantized keys rotated (the Hadamard with +-1
entries, exact in 16 bits, its 1/sqrt(D) folded into the softmax scale; fp16, see SCRATCH_DTYPE) and
raw keys as they are.

    fp = plan_flash(plan, cfg)                                   # once per batch (device indices)
    out, lse = run_flash(q, layer_pool, raw_k, raw_v, plan, cfg, sm_scale)   # per layer, lse base 2

`varlen_reference`, `dequant_reference` and `merge_reference` are the torch twins of the three
device pieces; the whole path is tested against extend.extend_reference.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch

from . import ops
from .config import OscarConfig
from .extend import segments
from .hadamard import hadamard_matrix
from .layout import FIELDS
from .quant import load_pages

BLOCK = 128                   # query tile of the page-prefill block part (FlashAttention's M tile)
# Which steps take this path: the extend kernel dequantizes the prefix once per query block, this path once
# per step but with a fixed cost (the scratch, the dequant and merge launches: 0.2-0.5 ms a layer), so it
# wins from fewer new tokens the longer the cached prefix. MIN_TOKENS[head_dim] lists (cached prefix tokens
# at least, new tokens needed there), the step's totals; a prefix between two bounds takes the lower one's.
# The crossovers of `bench/extend.py --sweep` on an H100 (extend_sweep_h100.json, prefixes 0 / 2k / 8k / 24k,
# 32/8 heads at d=128 and 9/3 at d=64; a head_dim not listed takes d=128's), taken where this path won in
# both runs (extend_sweep_h100_first.json, d=128 only): the kernel's times repeat to 1-2 %, this path's fixed
# cost at small steps (host launches) was 0.2 ms on one machine and 0.3-0.49 ms on the other.
MIN_TOKENS = {128: ((0, 4096), (2048, 768), (8192, 384), (24576, 256)),
              64: ((0, 4096), (8192, 2048), (24576, 768))}
SCRATCH_BYTES = 512 << 20     # at most this much dequantized K+V per step, else the extend kernel


class FlashPart(NamedTuple):
    """One FlashAttention call: sequence i = queries cu_q[i] .. cu_q[i+1]-1 over keys cu_k[i] ..+ used[i]."""
    cu_q: torch.Tensor     # int32 [n + 1], device: each sequence's first query, then T
    cu_k: torch.Tensor     # int32 [n + 1], device: each sequence's first key (they may overlap), then the key count
    used: torch.Tensor     # int32 [n], device: keys each sequence reads (FlashAttention's seqused_k)
    max_q: int             # most queries of a sequence, on the host: FlashAttention sizes its grid by it
    max_k: int             # most keys a sequence reads, on the host (FlashAttention's max_seqlen_k)
    causal: bool           # aligned to the end of the sequence's keys
    dequantized: bool      # keys from the dequantized scratch (rotated queries), else the raw scratch


@dataclasses.dataclass
class FlashPlan:
    """plan_flash's indices for one batch: the pages every layer dequantizes and the parts it merges."""
    page_ids: torch.Tensor | None   # int64 [n_pages], device: pool pages to dequantize (None when n_pages is 0)
    n_pages: int                    # len(page_ids) on the host: sizes the scratch without a sync
    parts: list[FlashPart]          # their states merged by log-sum-exp
    # (H, D) -> [k, v] SCRATCH_DTYPE [n_pages * P, H, D]: allocated at the first layer, reused by the others
    scratch: dict = dataclasses.field(default_factory=dict)


def _part(q_idx, k_start, used, T, n_keys, max_q, max_k, causal, dequantized) -> FlashPart:
    """The FlashPart of sequences starting at queries q_idx and keys k_start (device, any int dtype)."""
    i32 = torch.int32
    tail = lambda x, v: torch.cat([x.to(i32), x.new_full((1,), v, dtype=i32)])  # noqa: E731  (no host copy)
    return FlashPart(cu_q=tail(q_idx, T), cu_k=tail(k_start, n_keys), used=used.to(i32).contiguous(),
                     max_q=int(max_q), max_k=int(max_k), causal=causal, dequantized=dequantized)


def plan_flash(plan, cfg: OscarConfig) -> FlashPlan:
    """Device indices of the flash path for an extend plan (extend.plan_extend), no host sync."""
    P = plan.P
    info = plan.info.to(torch.int64)
    q_start, ext, pre, raw_off, rows = (info[:, i] for i in range(5))
    pre_c, ext_c = plan.prefix_cpu, plan.ext_cpu
    seq_c = [a + e for a, e in zip(pre_c, ext_c)]
    T, n_raw = sum(ext_c), plan.n_raw
    seq = pre + ext
    page = cfg.prefill == "page"
    if page:   # pages below the last query's own page
        n_dq_c = [(s - 1) // P if e else 0 for s, e in zip(seq_c, ext_c)]
        n_dq = torch.where(ext > 0, (seq - 1) // P, 0)
    else:      # the cached prefix's whole pages
        n_dq_c = [a // P if e else 0 for a, e in zip(pre_c, ext_c)]
        n_dq = torch.where(ext > 0, pre // P, 0)
    N = sum(n_dq_c)
    dq_off = (torch.cumsum(n_dq, 0) - n_dq) * P
    page_ids = None
    if N:
        seg, off = segments(n_dq, N)
        page_ids = (plan.req_to_token[rows[seg], off * P] // P).to(torch.int64)
    q_of = lambda s, p: q_start[s] + p - pre[s]  # noqa: E731  query index of position p of request s
    parts = []
    if page:
        B_ = max(BLOCK, P)
        # (1) blocks [k*B_, (k+1)*B_) of positions over dequantized keys [0, k*B_)
        nb_c = [(s - 1) // B_ - a // B_ + 1 if e else 0 for a, s, e in zip(pre_c, seq_c, ext_c)]
        if any(e and (s - 1) // B_ for s, e in zip(seq_c, ext_c)):
            nb = torch.where(ext > 0, (seq - 1) // B_ - pre // B_ + 1, 0)
            seg, off = segments(nb, sum(nb_c))
            k0 = (pre[seg] // B_ + off) * B_
            lo = torch.maximum(pre[seg], k0)
            parts.append(_part(q_of(seg, lo), dq_off[seg], k0, T, N * P, B_, max(seq_c), False, True))
        npg_c = [(s - 1) // P - a // P + 1 if e else 0 for a, s, e in zip(pre_c, seq_c, ext_c)]
        npg = torch.where(ext > 0, (seq - 1) // P - pre // P + 1, 0)
        seg, off = segments(npg, sum(npg_c))
        j0 = (pre[seg] // P + off) * P               # the query page's first position
        lo = torch.maximum(pre[seg], j0)
        hi = torch.minimum(seq[seg], j0 + P)
        # (2) the query page over the dequantized pages of its block below it
        if B_ > P and any(n > 1 or (a // P) % (B_ // P) for a, n in zip(pre_c, npg_c) if n):
            blk = j0 // B_ * B_
            parts.append(_part(q_of(seg, lo), dq_off[seg] + blk, j0 - blk, T, N * P, P, B_ - P, False, True))
        # (3) the query page over its own raw tokens, causal
        base = pre[seg] // P * P
        parts.append(_part(q_of(seg, lo), raw_off[seg] + j0 - base, hi - j0, T, n_raw, P, P, True, False))
    else:
        if N:
            parts.append(_part(q_start, dq_off, n_dq * P, T, N * P, max(ext_c), max(n_dq_c) * P, False, True))
        parts.append(_part(q_start, raw_off, seq - pre // P * P, T, n_raw, max(ext_c),
                           max(s - a // P * P for a, s in zip(pre_c, seq_c)), True, False))
    return FlashPlan(page_ids, N, parts)


def min_tokens(prefix: int, D: int) -> int:
    """New tokens a step over `prefix` cached tokens needs to take this path (MIN_TOKENS)."""
    return [n for bound, n in MIN_TOKENS.get(D, MIN_TOKENS[128]) if prefix >= bound][-1]


def fits(plan, H: int, D: int) -> bool:
    """The step is large enough to gain and its dequantized scratch is within SCRATCH_BYTES."""
    n = sum(s // plan.P for s in (a + e for a, e in zip(plan.prefix_cpu, plan.ext_cpu))) * plan.P
    T, pre = sum(plan.ext_cpu), sum(plan.prefix_cpu)
    return (T >= min_tokens(pre, D)
            and 2 * n * H * D * SCRATCH_DTYPE.itemsize <= SCRATCH_BYTES)


# ---- the device pieces and their torch twins -------------------------------------------------------------

def dequant_reference(layer_pool: dict, page_ids, bits: int, dtype):
    """Pages -> (k [N*P, H, D], v) in dtype: the rotated key times its token norm, and the value."""
    k, norm, v = load_pages({f: layer_pool[f][page_ids] for f in FIELDS}, bits)
    return (k * norm[..., None, None]).to(dtype).flatten(0, 1), v.to(dtype).flatten(0, 1)


def varlen_reference(q, k, v, cu_q, cu_k, used, causal: bool, scale: float):
    """FlashAttention's varlen forward with seqused_k, in fp32 loops: (out [T, Hq, D] q.dtype, lse [Hq, T] natural,
    -inf for a query that sees no key). Causal is aligned to the end: query r of Lq sees keys <= r + Lk - Lq."""
    T, Hq, D = q.shape
    g = Hq // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((Hq, T), float("-inf"), dtype=torch.float32, device=q.device)
    cq, ck, u = cu_q.tolist(), cu_k.tolist(), used.tolist()
    for i in range(len(u)):
        q0, q1, k0, n = cq[i], cq[i + 1], ck[i], u[i]
        if q1 == q0 or n == 0:
            continue
        qi = q[q0:q1].float()
        ki = k[k0:k0 + n].float().repeat_interleave(g, 1)
        vi = v[k0:k0 + n].float().repeat_interleave(g, 1)
        s = torch.einsum("thd,jhd->htj", qi, ki) * scale
        if causal:
            vis = torch.arange(n, device=q.device)[None, :] <= torch.arange(q1 - q0, device=q.device)[:, None] + n - (q1 - q0)
            s = s.masked_fill(~vis, float("-inf"))
        li = torch.logsumexp(s, -1)
        p = torch.exp(s - li[..., None]).nan_to_num(0.0)
        out[q0:q1] = torch.einsum("htj,jhd->thd", p, vi).to(q.dtype)
        lse[:, q0:q1] = li
    return out, lse


def merge_reference(outs, lses):
    """Merge of partial states (out [T, Hq, D], lse [Hq, T] natural; +-inf: empty) -> (out, lse [T, Hq] base 2)."""
    ls = torch.stack([torch.where(l == float("inf"), float("-inf"), l).t() for l in lses])   # [n, T, Hq]
    m = ls.amax(0)
    w = torch.exp(ls - torch.where(torch.isfinite(m), m, 0.0))
    w = torch.where(torch.isfinite(ls), w, 0.0)
    tot = w.sum(0)
    o = sum(wi[..., None] * oi.float() for wi, oi in zip(w, outs)) / torch.where(tot > 0, tot, 1.0)[..., None]
    return o.to(outs[0].dtype), torch.where(tot > 0, (m + torch.log(tot)) / math.log(2), float("-inf"))


def _flash(q, k, v, part: FlashPart, scale):
    if q.is_cuda:
        o, lse = torch.ops.aten._flash_attention_forward(
            q, k, v, part.cu_q, part.cu_k, part.max_q, part.max_k, 0.0, part.causal, False,
            scale=scale, seqused_k=part.used)[:2]
        return o, lse
    return varlen_reference(q, k, v, part.cu_q, part.cu_k, part.used, part.causal, scale)


_HADAMARD = {}
# The dequantized parts run in fp16 whatever the model dtype: their keys and rotated queries are rounded
# once more than the raw ones, and the softmax amplifies a logit's rounding (bf16's 2^-9 gave ~1 %
# output error on peaked rows); fp16's 2^-12 keeps it at the raw path's level. Keys and queries of
# served models stay far below fp16's 65504.
SCRATCH_DTYPE = torch.float16


def _rotated(q, cfg: OscarConfig):
    """(queries in the packed keys' space, in SCRATCH_DTYPE; the factor on the softmax scale)."""
    q = q.to(SCRATCH_DTYPE)
    if not cfg.rotate:
        return q, 1.0
    D = q.shape[-1]
    key = (D, q.device)
    if key not in _HADAMARD:   # +-1 entries: exact in fp16, the product accumulated in fp32, rounded once
        _HADAMARD[key] = (hadamard_matrix(D, torch.float64, q.device) * math.sqrt(D)).round().to(SCRATCH_DTYPE)
    return (q.reshape(-1, D) @ _HADAMARD[key]).view(q.shape), 1.0 / math.sqrt(D)


def run_flash(q, layer_pool: dict, raw_k, raw_v, plan, cfg: OscarConfig, sm_scale: float, out=None, lse=None):
    """Attention of the step's queries q [T, Hq, D] -> (out [T, Hq, D], lse [T, Hq] base 2); out / lse:
    optional destinations."""
    fp = plan.flash
    dk = dv = None
    if fp.n_pages:
        P, H, D = plan.P, raw_k.shape[1], raw_k.shape[2]
        key = (H, D)
        if key not in fp.scratch:   # one scratch per batch, shared by its layers
            fp.scratch = {key: [q.new_empty((fp.n_pages * P, H, D), dtype=SCRATCH_DTYPE) for _ in range(2)]}
        dk, dv = fp.scratch[key]
        if q.is_cuda:
            ops.load().dequant(*[layer_pool[f] for f in FIELDS], fp.page_ids, dk, dv, cfg.bits)
        else:
            dk[:], dv[:] = dequant_reference(layer_pool, fp.page_ids, cfg.bits, SCRATCH_DTYPE)
    qr, factor = _rotated(q, cfg) if dk is not None else (None, 1.0)
    outs, lses = [], []
    for part in fp.parts:
        if part.dequantized:
            o, l = _flash(qr, dk, dv, part, sm_scale * factor)
            o = o.to(q.dtype)
        else:
            o, l = _flash(q, raw_k, raw_v, part, sm_scale)
        outs.append(o)
        lses.append(l)
    if not q.is_cuda:
        o, l = merge_reference(outs, lses)
        out = o if out is None else out.copy_(o)
        return out, (l if lse is None or lse.numel() == 0 else lse.copy_(l))
    out = torch.empty_like(q) if out is None else out
    if lse is None or lse.numel() == 0:
        lse = q.new_empty(q.shape[:2], dtype=torch.float32)
    ops.load().merge(outs, lses, out, lse)
    return out, lse
