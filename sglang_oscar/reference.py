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
           return_lse=False):
    """q [T, Hq, D] raw queries at absolute positions q_pos [T]; qb [T] quantized boundaries.

    pages: this request's packed pages 0..n-1 in order (layout.FIELDS, leading dim n; n may be 0),
    covering every key below max(qb). raw_k/raw_v [R, H, D]: raw keys/values at positions
    raw_start .. raw_start+R-1, covering [qb[t], q_pos[t]] for every query t.
    Returns out [T, Hq, D] fp32 (and lse [T, Hq], natural log, when return_lse).
    """
    T, Hq, D = q.shape
    H = raw_k.shape[1] if raw_k.numel() else pages["k_codes"].shape[1]
    g = Hq // H
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    n_pages = pages["k_norm"].shape[0] if pages is not None else 0
    if n_pages:
        kq, norm, vq = load_pages(pages, cfg.bits)
        kq, vq = kq.flatten(0, 1), vq.flatten(0, 1)              # [n*P, H, D]
        norm = norm.flatten()
    q_pos = q_pos.to(torch.int64)
    qb = qb.to(torch.int64)
    rk, rv = raw_k.float(), raw_v.float()
    raw_pos = raw_start + torch.arange(rk.shape[0], device=q.device)
    outs, lses = [], []
    for s in range(0, T, QUERY_BLOCK):
        e = min(T, s + QUERY_BLOCK)
        qf = q[s:e].float().view(e - s, H, g, D)
        p, b = q_pos[s:e, None], qb[s:e, None]
        logits, values = [], []
        if n_pages:
            qr = rotate_queries(q[s:e], cfg).view(e - s, H, g, D)
            sq = torch.einsum("thgd,jhd->thgj", qr, kq) * (norm * scale)
            kpos = torch.arange(kq.shape[0], device=q.device)[None, :]
            vis = (kpos < b) & (kpos <= p)
            logits.append(sq.masked_fill(~vis[:, None, None, :], float("-inf")))
            values.append(vq)
        if rk.shape[0]:
            sr = torch.einsum("thgd,jhd->thgj", qf, rk) * scale
            vis = (raw_pos[None, :] >= b) & (raw_pos[None, :] <= p)
            logits.append(sr.masked_fill(~vis[:, None, None, :], float("-inf")))
            values.append(rv)
        lg = torch.cat(logits, -1)
        lse = torch.logsumexp(lg, -1)                              # [t, H, g]
        prob = torch.exp(lg - lse[..., None])
        o = torch.einsum("thgj,jhd->thgd", prob, torch.cat(values, 0))
        outs.append(o.reshape(e - s, Hq, D))
        lses.append(lse.reshape(e - s, Hq))
    out = torch.cat(outs)
    return (out, torch.cat(lses)) if return_lse else out


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
