"""Attention over the packed pool for a whole batch at once, in plain torch: the CPU serving path.

The semantics are reference.attend's, request by request (the spec this is tested against); the work is
batched: per layer and step one store of every page the batch completes, one dequantization of each
page any query needs (pages shared by requests or by query rows are dequantized once), and attention
vectorized over the batch. Host-side planning (`plan`) runs once per batch; every layer reuses it.

Queries are cut into "query rows" of at most QUERY_ROW tokens of one request (a decode token is a row of
one), so a long prompt and short ones share a batch without padding each to the longest. Keys stream
in blocks of whole pages with an online softmax: first the packed pages (through the page table), then
the step's raw pages (the residual and the new tokens, laid out as pages). Each block only involves
the query rows that can see some key in it (causal skipping), and its size is chosen so the scratch
(logits, dequantized keys and values) stays within SCRATCH_ELEMS elements whatever the context length.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import K_GROUP, V_GROUP, OscarConfig
from .layout import FIELDS
from .quant import rotate_queries

QUERY_ROW = 64            # query tokens of one request per row
SCRATCH_ELEMS = 1 << 22   # fp32 elements of one block's logits or of its dequantized K (about 16 MB)


@dataclass
class KeyBlock:
    packed: bool
    c0: int                     # first column (packed: page index; raw: relative to the row's first)
    n: int                      # columns (pages) in this block
    sub: object                 # query rows involved: a slice (all) or an int64 index
    table: torch.Tensor         # packed: [n_uniq] pool page ids; raw: [n_sub, n] raw page index
    inverse: torch.Tensor | None = None  # packed: [n_sub, n] index into the dequantized pages (None: in order)


@dataclass
class Plan:
    P: int
    T: int
    rows: torch.Tensor          # [B] request rows
    n_raw: int                  # raw pages of this step (row n_raw of the raw buffer is a zero page)
    new_dst: torch.Tensor       # [T] flat raw slot of each new token
    res: tuple | None           # (rows, raw pages): residual rows copied to each request's first raw page
    store: tuple | None         # (raw pages, pool page ids): pages this step completes
    tail: tuple | None          # (raw pages, rows): new partial pages, back into the residual
    q_idx: torch.Tensor         # [R, E] flat query index of each row slot (T = padding)
    q_pos: torch.Tensor         # [R, E] absolute position (-1 = padding)
    q_qb: torch.Tensor          # [R, E] quantized boundary
    raw_base: torch.Tensor      # [R] position of each row's first raw column
    out_idx: torch.Tensor       # [T] row slot of each query
    blocks: list = field(default_factory=list)


_LUT: dict = {}


def _codes_as_float(words: torch.Tensor, bits: int) -> torch.Tensor:
    """layout.unpack_codes(words, bits).float() in one table lookup per byte: byte j of a word holds
    codes 4j.. (2 bits) or 2j.. (4 bits), lowest bits first (little-endian), so a 256-entry table of
    code tuples turns bytes straight into floats. This runs on every needed page of every layer."""
    key = (bits, words.device)
    if key not in _LUT:
        per, byte = 8 // bits, torch.arange(256, dtype=torch.int32)
        shifts = torch.arange(0, 8, bits, dtype=torch.int32)
        _LUT[key] = ((byte[:, None] >> shifts) & ((1 << bits) - 1)).float().to(words.device)
    b = words.contiguous().view(torch.uint8)
    return _LUT[key].index_select(0, b.flatten().to(torch.int32)).view(*b.shape[:-1], -1)


def _load_pages(pages: dict, bits: int):
    """quant.load_pages (same arithmetic, so the same floats), V left in its stored [N, H, P, D] order."""
    N, H, G, D, _ = pages["k_codes"].shape
    kc = _codes_as_float(pages["k_codes"], bits).view(N, H, G, D, K_GROUP)
    k = torch.addcmul(pages["k_zero"].float().unsqueeze(-1), kc, pages["k_scale"].float().unsqueeze(-1))
    k = k.permute(0, 2, 4, 1, 3).reshape(N, G * K_GROUP, H, D)
    vc = _codes_as_float(pages["v_codes"], bits)                       # [N, H, P, D]
    P = vc.shape[2]
    vc = vc.view(N, H, P, D // V_GROUP, V_GROUP)
    v = torch.addcmul(pages["v_zero"].float().unsqueeze(-1), vc, pages["v_scale"].float().unsqueeze(-1))
    return k, pages["k_norm"].float(), v.view(N, H, P, D)


def _ceil_div(a, b):
    return -(-a // b)


def _ranges(counts: torch.Tensor):
    """(owner, offset) of every element when owner i has counts[i] elements, in order."""
    owner = torch.repeat_interleave(torch.arange(counts.numel()), counts)
    start = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(owner.numel()) - start[owner]


def plan(rows, prefix, ext, cfg: OscarConfig, req_to_token: torch.Tensor, Hq: int | None = None,
         H: int | None = None, D: int | None = None) -> Plan:
    """Host-side indices of one batch: request rows, cached prefix lengths and new-token counts.

    Hq/H/D size the key blocks (the scratch bound); without them a generic head shape is assumed.
    """
    P = cfg.page_size
    dev = req_to_token.device
    rows_t = torch.as_tensor(rows, dtype=torch.int64)
    pre = torch.as_tensor(prefix, dtype=torch.int64)
    e = torch.as_tensor(ext, dtype=torch.int64)
    B, T = rows_t.numel(), int(e.sum())
    seq = pre + e
    base = pre // P * P
    first, full = pre // P, seq // P
    n_raw_i = _ceil_div(seq - base, P)
    off = torch.cumsum(n_raw_i, 0) - n_raw_i
    n_raw = int(n_raw_i.sum())

    # Raw layout: request i's raw tokens from its page-aligned base fill raw pages off_i ..
    tok_req, tok_j = _ranges(e)
    new_dst = off[tok_req] * P + (pre - base)[tok_req] + tok_j
    has_res = (pre - base) > 0
    res = (rows_t[has_res], off[has_res]) if bool(has_res.any()) else None
    st_req, st_c = _ranges(full - first)
    store = None
    if st_req.numel():
        cols = ((first[st_req] + st_c) * P).to(dev)
        ids = (req_to_token[rows_t[st_req].to(dev), cols] // P).to(torch.int64)
        store = (off[st_req] + st_c, ids)
    has_tail = seq > full * P
    tail = (off[has_tail] + (full - first)[has_tail], rows_t[has_tail]) if bool(has_tail.any()) else None

    # Query rows.
    E = max(1, min(int(e.max()) if B else 1, QUERY_ROW))
    nq = _ceil_div(e, E)
    r_req, r_k = _ranges(nq)
    j = r_k[:, None] * E + torch.arange(E)[None, :]                      # [R, E] index in its request
    valid = j < e[r_req][:, None]
    cu = torch.cumsum(e, 0) - e
    q_idx = torch.where(valid, cu[r_req][:, None] + j, torch.full_like(j, T))
    q_pos = torch.where(valid, pre[r_req][:, None] + j, torch.full_like(j, -1))
    if cfg.prefill == "page":
        qb = q_pos.clamp(min=0) // P * P
    else:
        qb = base[r_req][:, None].expand_as(q_pos)
    qb = torch.where(valid, qb, torch.zeros_like(qb))
    out_idx = (torch.arange(r_req.numel())[:, None] * E + torch.arange(E)[None, :])[valid]

    p = Plan(P=P, T=T, rows=rows_t, n_raw=n_raw, new_dst=new_dst, res=res, store=store, tail=tail,
             q_idx=q_idx, q_pos=q_pos, q_qb=qb, raw_base=base[r_req], out_idx=out_idx)
    R = r_req.numel()
    if R == 0:
        return p
    Hq, H, D = Hq or 32, H or 8, D or 128
    # pages per block: logits [n_sub, E, Hq, n*P] and dequantized K [n_sub, n*P, H, D] within the bound
    per_page = R * P * max(E * Hq, H * D)
    kb = max(1, SCRATCH_ELEMS // per_page)

    # Packed pages: row r needs columns below its last query's boundary.
    last = valid.sum(1) - 1
    need = qb.gather(1, last[:, None])[:, 0] // P                         # [R]
    n_packed = int(need.max())
    if n_packed:
        cols = (torch.arange(n_packed) * P).to(dev)
        req_table = (req_to_token[rows_t.to(dev)[:, None], cols[None, :]] // P).to(torch.int64).cpu()
        for c0 in range(0, n_packed, kb):
            n = min(kb, n_packed - c0)
            sel = torch.nonzero(need > c0)[:, 0]
            sub = slice(None) if sel.numel() == R else sel
            c = c0 + torch.arange(n)
            t = req_table[r_req[sel]][:, c0:c0 + n]
            t = torch.where(c[None, :] < need[sel][:, None], t, torch.full_like(t, -1))
            uniq, inv = torch.unique(t, return_inverse=True)
            if int(uniq[0]) == -1:   # padding columns read any real page: their keys are masked
                uniq, inv = uniq[1:], (inv - 1).clamp(min=0)
            if inv.numel() == uniq.numel() and torch.equal(inv.flatten(), torch.arange(inv.numel())):
                inv = None           # already in order, nothing shared: no gather
            p.blocks.append(KeyBlock(True, c0, n, sub, uniq.to(dev), None if inv is None else inv.to(dev)))

    # Raw pages: row r sees raw keys from its first query's boundary to its last query, i.e. its
    # request's raw pages lo_r .. hi_r (page prefill: its own one or two; chunk prefill: all so far).
    # Raw columns are relative to lo_r, so no row computes logits for raw pages it cannot see.
    lo = (qb[:, 0] - base[r_req]) // P
    hi = (q_pos.gather(1, last[:, None])[:, 0] - base[r_req]) // P       # inclusive
    width = hi - lo + 1
    p.raw_base = base[r_req] + lo * P                                     # position of relative column 0
    for c0 in range(0, int(width.max()), kb):
        sel = torch.nonzero(width > c0)[:, 0]
        n = min(kb, int(width[sel].max()) - c0)
        sub = slice(None) if sel.numel() == R else sel
        rq = r_req[sel]
        col = lo[sel][:, None] + c0 + torch.arange(n)[None, :]
        t = torch.where(col < n_raw_i[rq][:, None], off[rq][:, None] + col, torch.full_like(col, n_raw))
        p.blocks.append(KeyBlock(False, c0, n, sub, t.to(dev)))
    for name in ("q_idx", "q_pos", "q_qb", "raw_base", "out_idx", "new_dst"):
        setattr(p, name, getattr(p, name).to(dev))
    for name in ("res", "store", "tail"):
        v = getattr(p, name)
        if v is not None:
            setattr(p, name, tuple(x.to(dev) for x in v))
    return p


def _attend_lse(q, k, v, bias, scale):
    """(softmax(q k^T * scale + bias) v, natural log-sum-exp) in fp32. On a CPU through torch's CPU flash
    attention (which returns the lse); elsewhere (the torch path on a GPU the kernels do not serve, and
    the reference of the GPU tests) by plain matmuls, since that operator exists only for the CPU."""
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=bias,
                                                                          scale=scale)
    return _attend_lse_matmul(q, k, v, bias, scale)


def _attend_lse_matmul(q, k, v, bias, scale):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(s, dim=-1)
    w = torch.nan_to_num(torch.exp(s - lse[..., None]))   # a fully masked row: lse -inf, weights 0
    return torch.matmul(w, v), lse


def forward(p: Plan, q, k, v, pages, res_k, res_v, cfg: OscarConfig, sm_scale: float, store_fn):
    """One layer: q [T, Hq, D], k/v [T, H, D] of this step -> out [T, Hq, D] fp32.

    Writes the pool first (completed pages through store_fn(k, v, page_ids, pages, cfg), the new
    partial pages into the residual rows), then attends, so a query reads its earlier pages packed.
    """
    P = p.P
    T, Hq, D = q.shape
    H = k.shape[1]
    g = Hq // H
    raw = []
    for new, resid in ((k, res_k), (v, res_v)):
        buf = resid.new_zeros((p.n_raw + 1, P, H, D))   # + a zero page for padding columns
        if p.res is not None:
            buf[p.res[1]] = resid[p.res[0]]
        buf.view(-1, H, D)[p.new_dst] = new.to(resid.dtype)
        raw.append(buf)
    raw_k, raw_v = raw
    if p.store is not None:
        store_fn(raw_k[p.store[0]], raw_v[p.store[0]], p.store[1], pages, cfg)
    if p.tail is not None:
        res_k[p.tail[1]] = raw_k[p.tail[0]]
        res_v[p.tail[1]] = raw_v[p.tail[0]]
    if T == 0:
        return q.new_zeros((0, Hq, D), dtype=torch.float32)

    R, E = p.q_idx.shape
    qpad = torch.cat([q, q.new_zeros((1, Hq, D))])[p.q_idx]              # [R, E, Hq, D]

    def heads_major(x):  # [R, E, H, g, D] -> [R, H, E*g, D]: a KV head's query heads as extra query rows
        return x.view(R, E, H, g, D).permute(0, 2, 1, 3, 4).reshape(R, H, E * g, D)
    qf = heads_major(qpad.float())
    qr = heads_major(rotate_queries(qpad, cfg)) if any(b.packed for b in p.blocks) else None
    lse = torch.full((R, H, E * g), float("-inf"), device=q.device)
    acc = torch.zeros((R, H, E * g, D), device=q.device)
    for b in p.blocks:
        n_sub = p.q_idx[b.sub].shape[0]
        kpos = (b.c0 * P + torch.arange(b.n * P, device=q.device))
        if b.packed:
            kq, norm, vq = _load_pages({f: pages[f][b.table] for f in FIELDS}, cfg.bits)
            if b.inverse is not None:
                kq, vq, norm = kq[b.inverse], vq[b.inverse], norm[b.inverse]
            # the norm multiplies the logits, so it can scale the keys: q_rot . (k_hat * norm)
            keys = (kq.reshape(n_sub, b.n * P, H, D) * norm.reshape(n_sub, b.n * P, 1, 1)).transpose(1, 2)
            vals = vq.reshape(n_sub, b.n, H, P, D).transpose(1, 2).reshape(n_sub, H, b.n * P, D)
            qs = qr[b.sub]
            vis = kpos[None, None, :] < p.q_qb[b.sub][:, :, None]
        else:
            keys = raw_k[b.table].view(n_sub, b.n * P, H, D).transpose(1, 2).float()
            vals = raw_v[b.table].view(n_sub, b.n * P, H, D).transpose(1, 2).float()
            qs = qf[b.sub]
            kp = p.raw_base[b.sub][:, None, None] + kpos[None, None, :]   # [n_sub, 1, n*P]
            vis = (kp >= p.q_qb[b.sub][:, :, None]) & (kp <= p.q_pos[b.sub][:, :, None])
        # torch's CPU flash attention, which also returns the log-sum-exp the blocks merge by
        bias = torch.where(vis[:, :, None, :].expand(n_sub, E, g, b.n * P), 0.0, float("-inf"))
        o_b, lse_b = _attend_lse(qs, keys.contiguous(), vals.contiguous(), bias.view(n_sub, 1, E * g, b.n * P),
                                 sm_scale)
        seen = vis.any(-1)[:, None, :, None].expand(n_sub, H, E, g).reshape(n_sub, H, E * g)
        lse_b = torch.where(seen, lse_b, float("-inf"))  # the kernel reports 0 for a fully masked row
        l_old = lse[b.sub]
        l_new = torch.logaddexp(l_old, lse_b)
        w_old = torch.nan_to_num(torch.exp(l_old - l_new))   # nan: nothing seen yet on either side
        w_b = torch.nan_to_num(torch.exp(lse_b - l_new))
        acc[b.sub] = acc[b.sub] * w_old[..., None] + torch.where(seen[..., None], o_b, 0.0) * w_b[..., None]
        lse[b.sub] = l_new
    out = acc.view(R, H, E, g, D).permute(0, 2, 1, 3, 4)
    return out.reshape(R * E, Hq, D)[p.out_idx]
