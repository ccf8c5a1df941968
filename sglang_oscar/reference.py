"""Attention over a paged OScaR cache in plain torch: the CPU serving path and the kernels' oracle.

One request at a time (FlashInfer's rule: every batched kernel is tested against a simple
single-request reference). Key j is visible to the query at position p iff j <= p; it is read
through its packed page iff j < qb, the query's "quantized boundary" (a multiple of the page size),
and from the raw bf16 keys otherwise:
  - page-consistent prefill and every decode step: qb = P * (p // P) (earlier pages packed, own
    page raw);
  - OScaR's chunk prefill: qb = P * (prefix_len // P) (only the cached prefix is packed).
"""
from __future__ import annotations

import math

import torch

from .config import OscarConfig
from .quant import load_pages, rotate_queries

QUERY_BLOCK = 512  # bounds the [T, heads, keys] score tensor


def attend(q, q_pos, qb, pages, raw_k, raw_v, raw_start, cfg: OscarConfig, sm_scale=None,
           return_lse=False, sink=None):
    """q [T, Hq, D] raw queries at absolute positions q_pos [T]; qb [T] quantized boundaries.

    pages: this request's packed pages 0..n-1 in order (layout.FIELDS, leading dim n; n may be 0),
    covering every key below max(qb). raw_k/raw_v [R, H, D]: raw keys/values at positions
    raw_start .. raw_start+R-1, covering [qb[t], q_pos[t]] for every query t.
    sink (cfg.raw_first_page): the raw keys/values [P, H, D] of positions 0..P-1, read instead of
    packed page 0 below each query's boundary.
    Every tensor but q_pos/qb may carry one more leading dim, B sequences with the same positions
    and cache shapes (q [B, T, Hq, D], pages [B, n, ...], raw [B, R, H, D], sink [B, P, H, D]):
    the same math per sequence.
    Returns out [T, Hq, D] fp32 (and lse [T, Hq], natural log, when return_lse), [B, ...] if batched.
    """
    lead = q.shape[:-3]
    T, Hq, D = q.shape[-3:]
    H = raw_k.shape[-2] if raw_k.numel() else pages["k_codes"].shape[-4]
    g = Hq // H
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    n_pages = pages["k_codes"].shape[len(lead)] if pages is not None else 0
    if n_pages:
        flat = {f: x.flatten(0, len(lead)) for f, x in pages.items()} if lead else pages
        kq, norm, vq = load_pages(flat, cfg.bits)
        kq, vq = kq.reshape(*lead, -1, H, D), vq.reshape(*lead, -1, H, D)   # [..., n*P, H, D]
        if norm.dim() == 3:   # per KV head [N, P, H] -> [..., 1, H, 1, n*P] against the logits
            norm = norm.reshape(*lead, -1, H).transpose(-1, -2).unsqueeze(-2).unsqueeze(-4)
        else:
            norm = norm.reshape(*lead, -1)
            if lead:
                norm = norm[..., None, None, None, :]
    raw_sink = cfg.raw_first_page and n_pages > 0
    if raw_sink and sink is None:
        raise ValueError("cfg.raw_first_page: attend needs the first page's raw keys/values (sink=)")
    q_pos = q_pos.to(torch.int64)
    qb = qb.to(torch.int64)
    rk, rv = raw_k.float(), raw_v.float()
    raw_pos = raw_start + torch.arange(rk.shape[-3], device=q.device)
    outs, lses = [], []
    for s in range(0, T, QUERY_BLOCK):
        e = min(T, s + QUERY_BLOCK)
        qf = q[..., s:e, :, :].float().view(*lead, e - s, H, g, D)
        p, b = q_pos[s:e, None], qb[s:e, None]
        logits, values = [], []
        if n_pages:
            qr = rotate_queries(q[..., s:e, :, :], cfg).view(*lead, e - s, H, g, D)
            sq = torch.einsum("...thgd,...jhd->...thgj", qr, kq).mul_(norm * scale)  # in place: the same floats
            kpos = torch.arange(kq.shape[-3], device=q.device)[None, :]
            vis = (kpos < b) & (kpos <= p)
            if raw_sink:   # page 0 is read raw below (the sink), never through its packed form
                vis = vis & (kpos >= cfg.page_size)
            logits.append(sq.masked_fill_(~vis[:, None, None, :], float("-inf")))
            values.append(vq)
        if raw_sink:
            sk, sv = sink[0].float(), sink[1].float()
            ss = torch.einsum("...thgd,...jhd->...thgj", qf, sk).mul_(scale)
            spos = torch.arange(sk.shape[-3], device=q.device)[None, :]
            vis = (spos < b) & (spos <= p)   # at and above the boundary, raw_k holds them
            logits.append(ss.masked_fill_(~vis[:, None, None, :], float("-inf")))
            values.append(sv)
        if rk.shape[-3]:
            sr = torch.einsum("...thgd,...jhd->...thgj", qf, rk).mul_(scale)
            vis = (raw_pos[None, :] >= b) & (raw_pos[None, :] <= p)
            logits.append(sr.masked_fill_(~vis[:, None, None, :], float("-inf")))
            values.append(rv)
        lg = torch.cat(logits, -1) if len(logits) > 1 else logits[0]
        lse = torch.logsumexp(lg, -1)                              # [..., t, H, g]
        prob = lg.sub_(lse[..., None]).exp_()   # in place (bounds the memory of long prompts): the same floats
        o = torch.einsum("...thgj,...jhd->...thgd", prob, torch.cat(values, -3))
        outs.append(o.reshape(*lead, e - s, Hq, D))
        lses.append(lse.reshape(*lead, e - s, Hq))
    out = torch.cat(outs, -3)
    return (out, torch.cat(lses, -2)) if return_lse else out


def boundaries(q_pos: torch.Tensor, prefix_len: int, cfg: OscarConfig) -> torch.Tensor:
    """Quantized boundary of each query of an extend chunk (see the module doc)."""
    P = cfg.page_size
    if cfg.prefill == "page":
        return (q_pos // P) * P
    return torch.full_like(q_pos, (prefix_len // P) * P)


def dense_attention(q, k, v, sm_scale=None):
    """Causal float64 attention of the last T queries over S keys: q [T, Hq, D], k/v [S, H, D]."""
    T, Hq, D = q.shape
    S, H, _ = k.shape
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    qd = q.double().view(T, H, Hq // H, D)
    s = torch.einsum("thgd,jhd->thgj", qd, k.double()) * scale
    pos = torch.arange(S - T, S)[:, None]
    s = s.masked_fill(~(torch.arange(S)[None, :] <= pos)[:, None, None, :], float("-inf"))
    return torch.einsum("thgj,jhd->thgd", torch.softmax(s, -1), v.double()).reshape(T, Hq, D)
