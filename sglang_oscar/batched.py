"""Attention over the packed pool for a whole batch at once, in plain torch: the CPU serving path.

The semantics are reference.attend's, request by request (the spec this is tested against); the work is
batched: per layer and step one store of every page the batch completes, one dequantization of each
page any query needs (pages shared by requests or by queries are dequantized once), and attention
vectorized over the batch. Host-side planning (`plan`) runs once per batch; every layer reuses it.

Queries are cut into "query rows" of at most QUERY_ROW tokens of one request (a decode token is a row of
one), so a long prompt and short ones share a batch without padding each to the longest. Keys stream
in blocks of whole pages with an online softmax: first the packed pages (through the page table), then
the step's raw pages (the residual and the new tokens, laid out as pages). Each block only involves
the query rows that can see some key in it (causal skipping), and its size is chosen so the scratch
(logits, dequantized keys and values) stays within SCRATCH_ELEMS elements whatever the context length.

Prefill on the CPU (a batch where some request adds more than one token; FUSED_PREFILL) goes another
way, with no masked tile computed: a request's queries are cut into groups of one quantized boundary qb
(page prefill: the tokens of one page; chunk prefill: the whole chunk). A group sees the packed keys
[0, qb) and the raw keys [qb, p]: two calls of torch's fused CPU attention (flash, fp32), one without a
mask over a prefix of its request's dequantized keys, one causal over the group's raw pages, merged by
their log-sum-exps. The packed keys go in blocks of pages (the same scratch bound), merged the same way.

Decode on the CPU (every request adds one token; PAGE_DECODE) skips the query rows and the raw page
buffer: the new token is written straight into its request's residual row (which then holds exactly the
token's raw keys), a page it completes is packed from there, and each needed page is dequantized once for
the batch. Logits are computed per (request, page) pair, with no padding of keys or values to the longest
request; they are scattered into one [request, head, key] row per request (padding -inf), the raw logits
appended, and one softmax per row replaces the online softmax (long contexts: blocks of pages within the
scratch bound, merged by their log-sum-exps). The per-pair products are summed into each request's output.
A decode step is a few dozen torch operations per layer, whatever the batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import K_GROUP, V_GROUP, OscarConfig
from .hadamard import hadamard_matrix
from .layout import FIELDS
from .quant import rotate_queries

QUERY_ROW = 64            # query tokens of one request per row
SCRATCH_ELEMS = 1 << 22   # fp32 elements of one block's logits or of its dequantized K (about 16 MB)
FUSED_PREFILL = True      # prefill of CPU tensors through torch's fused attention (else: query rows)
PAGE_DECODE = True        # decode of CPU tensors page by page for the whole batch (else: query rows)
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu   # -> (out, natural-log lse)


@dataclass
class KeyBlock:
    packed: bool
    c0: int                     # first column (packed: page index of the request; raw: relative to pos0)
    n: int                      # columns (pages) in this block
    sub: object                 # query rows involved: a slice (all) or an int64 index
    table: torch.Tensor         # packed: [n_uniq] pool page ids; raw: [n_sub, n] raw page index
    inverse: torch.Tensor | None = None  # packed: [n_sub, n] index into the dequantized pages (None: in order)
    groups: list | None = None  # packed, rows of one request together: [(rows, index into table or
                                # None: all of it in order, pages)] per request; keys not copied per row
    pos0: torch.Tensor | None = None     # raw: [n_sub] position of column 0 of each row's table


@dataclass
class PackedBlock:
    """Prefill: packed pages [c0, c0 + n) of the requests that read any, dequantized once."""
    c0: int
    n: int
    table: torch.Tensor         # [n_uniq] pool page ids
    reqs: list                  # [(at, n_u, calls)] per request: its n_u pages are the dequantized pages
                                # at .. at + n_u (an int) or at an index ([n_u]); calls: [(t0, t1, L)],
                                # queries t0..t1 (one qb group) see the first L keys of its pages here


@dataclass
class Prefill:
    blocks: list                # [PackedBlock]
    raw: list                   # [(pages [G, n], slot [T_n], tok [T_n] or None: all)] per raw span of n pages:
                                # groups reading n raw pages, each query's slot in [G * n * P] (its key
                                # offset in its group's pages; None: slot = query) and which queries these are


@dataclass
class DecodeBlock:
    """Decode: packed pages [c0, c0 + n) of the requests that read any, as (request, page) pairs."""
    n: int
    sub: object                 # requests with pairs here: a slice (all) or an int64 index [n_sub]
    table: torch.Tensor         # [n_uniq] pool page ids, each needed page once
    inverse: torch.Tensor | None  # [M] each pair's page in table (None: the pairs are the table, in order)
    req: torch.Tensor           # [M] each (request, page) pair's request in the batch (for its query)
    loc: torch.Tensor           # [M] ... among this block's requests (sub)
    col: torch.Tensor           # [M] its page relative to c0


@dataclass
class Decode:
    rows: torch.Tensor          # [B] request rows
    slot: torch.Tensor          # [B] the new token's slot in its residual row (= raw keys before it)
    vis: torch.Tensor           # [B, R] raw keys visible in residual slots 0..R-1 (R: longest)
    store: tuple | None         # (rows, pool page ids): residual rows the new token completes
    blocks: list                # [DecodeBlock]; the first one (if any) covers every request


@dataclass
class Plan:
    P: int
    T: int
    rows: torch.Tensor          # [B] request rows
    n_raw: int                  # raw pages of this step (row n_raw of the raw buffer is a zero page)
    new_dst: torch.Tensor | None  # [T] flat raw slot of each new token (decode: None, see Decode)
    res: tuple | None           # (rows, raw pages): residual rows copied to each request's first raw page
    store: tuple | None         # (raw pages, pool page ids): pages this step completes
    tail: tuple | None          # (raw pages, rows): new partial pages, back into the residual
    # query rows (prefill is None)
    q_idx: torch.Tensor | None = None   # [R, E] flat query index of each row slot (T = padding)
    q_pos: torch.Tensor | None = None   # [R, E] absolute position (-1 = padding)
    q_qb: torch.Tensor | None = None    # [R, E] quantized boundary
    out_idx: torch.Tensor | None = None  # [T] row slot of each query
    blocks: list = field(default_factory=list)
    prefill: Prefill | None = None
    decode: Decode | None = None


# (bits, device) -> each byte value's codes: int32 [256] at 2 bits (a word's bytes), else uint8 [256, 8 / bits]
_CODES = {}


def _unpack(b: torch.Tensor, bits: int) -> torch.Tensor:
    """Bytes [..., m] of layout.pack_codes words (little-endian: code i in byte i // per) -> fp32 codes
    [..., m * 8 / bits]: a 256-entry table gives each byte's codes (at 2 bits as the bytes of one int32:
    a quarter of the gather's writes of a float table; twice as fast as shifting and masking bytes)."""
    key = (bits, b.device)
    if key not in _CODES:
        shifts = torch.arange(0, 8, bits, device=b.device)
        codes = ((torch.arange(256, device=b.device)[:, None] >> shifts) & ((1 << bits) - 1)).to(torch.uint8)
        _CODES[key] = codes.view(torch.int32).flatten() if bits == 2 else codes
    out = _CODES[key].index_select(0, b.flatten().int())
    return (out.view(torch.uint8) if bits == 2 else out).float().view(*b.shape[:-1], -1)


def _dequant(pages: dict, bits: int, rows: int, token_major_keys: bool = False):
    """quant.load_pages (the same float ops per element, so the same floats) of N = rows x n pages, laid
    out for the attention matmuls: K [H, rows, D, n*P] and V [H, rows, n*P, D] fp32, the token norms
    [rows, n*P]. The packed bytes are permuted (a sixteenth of the floats' bytes) so that the unpacked
    keys and values need no permuting copy before or inside the matmuls. token_major_keys: K as
    [N*P, H, D] instead, for the keys one request's query rows share (the product over them then rounds
    as it always has; a single request gains nothing from the other layout)."""
    N, H, G, D, _ = pages["k_codes"].shape
    n, P = N // rows, G * K_GROUP

    def scales(name, *order):   # fp16 scale/zero -> fp32 in the codes' order, broadcast over a group
        x = pages[name].view(rows, n, *pages[name].shape[1:]).permute(*order) if order else pages[name]
        return x.contiguous().float().unsqueeze(-1)
    kb = pages["k_codes"].view(torch.uint8)                            # [N, H, G, D, bytes]
    order = () if token_major_keys else (2, 0, 4, 1, 3)                # -> [H, rows, D, n, G]
    if order:
        kb = kb.view(rows, n, H, G, D, -1).permute(*order, 5).contiguous()
    k = _unpack(kb, bits).mul_(scales("k_scale", *order)).add_(scales("k_zero", *order))
    k = k.permute(0, 2, 4, 1, 3).reshape(N * P, H, D) if token_major_keys else k.view(H, rows, D, n * P)
    return k, pages["k_norm"].float().view(rows, n * P), _values(pages, bits, rows)


def _values(pages: dict, bits: int, rows: int | None = None) -> torch.Tensor:
    """The values of N = rows x n pages, V [H, rows, n*P, D] fp32 (quant.load_pages' float ops): the
    codes are permuted head-major as bytes, then unpacked and scaled in place. rows None: as stored,
    page-major [N, H, P, D] (no permuting copy)."""
    N, H, P, _ = pages["v_codes"].shape
    D = pages["v_scale"].shape[-1] * V_GROUP
    n = N // (rows or 1)

    def head_major(x):
        return x if rows is None else x.view(rows, n, H, P, -1).permute(2, 0, 1, 3, 4).contiguous()
    vc = _unpack(head_major(pages["v_codes"].view(torch.uint8)), bits).view(-1, D // V_GROUP, V_GROUP)
    for name, op in (("v_scale", vc.mul_), ("v_zero", vc.add_)):
        op(head_major(pages[name]).float().reshape(-1, D // V_GROUP, 1))
    return vc.view(N, H, P, D) if rows is None else vc.view(H, rows, n * P, D)


def _keys(pages: dict, bits: int) -> torch.Tensor:
    """The keys of N pages in the codes' order, k_hat [N, H, G, D, 32] fp32 (quant.load_pages' float ops)."""
    k = _unpack(pages["k_codes"].view(torch.uint8), bits)
    return k.mul_(pages["k_scale"].float().unsqueeze(-1)).add_(pages["k_zero"].float().unsqueeze(-1))


def _dequant_kv(pages: dict, bits: int):
    """quant.load_pages of N pages laid out for the fused attention: K * norm [H, N*P, D] and V [H, N*P, D]
    fp32 (each head's keys token-major, channels contiguous). The norm is folded into the keys, which
    rounds the logits once more than the spec's (q . k_hat) * norm (a relative 6e-8)."""
    N, H, G, D, _ = pages["k_codes"].shape
    P = G * K_GROUP
    k = _keys(pages, bits)
    kt = k.new_empty((H, N, G, K_GROUP, D))                                # the norm and the transpose: one pass
    torch.mul(k.permute(1, 0, 2, 4, 3), pages["k_norm"].float().view(1, N, G, K_GROUP, 1), out=kt)
    return kt.view(H, N * P, D), _values(pages, bits, 1).view(H, N * P, D)


_HADAMARD = {}


def _hadamard(n: int, device) -> torch.Tensor:
    """The fp32 Hadamard matrix (symmetric: x @ H rotates rows x as hadamard.hadamard does)."""
    if (n, device) not in _HADAMARD:
        _HADAMARD[(n, device)] = hadamard_matrix(n, torch.float64).to(device=device, dtype=torch.float32)
    return _HADAMARD[(n, device)]


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
    Hq, H, D = Hq or 32, H or 8, D or 128
    if PAGE_DECODE and B and dev.type == "cpu" and bool((e == 1).all()):   # no raw page buffer
        return Plan(P=P, T=T, rows=rows_t, n_raw=0, new_dst=None, res=None, store=None, tail=None,
                    decode=_plan_decode(rows_t, pre, cfg, req_to_token, Hq, H * D))
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
    if FUSED_PREFILL and B and int(e.max()) > 1 and dev.type == "cpu":
        pf = _plan_prefill(tok_req, pre[tok_req] + tok_j, base, off, rows_t, cfg, req_to_token, H * D)
        return _to(Plan(P=P, T=T, rows=rows_t, n_raw=n_raw, new_dst=new_dst, res=res, store=store, tail=tail,
                        prefill=pf), dev)

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
             q_idx=q_idx, q_pos=q_pos, q_qb=qb, out_idx=out_idx)
    R = r_req.numel()
    if R == 0:
        return _to(p, dev)
    # pages per block: logits [n_sub, E, Hq, n*P] and dequantized K [n_sub, n*P, H, D] within the bound.
    # (Smaller blocks would let a prompt's early rows skip more pages, but each block boundary is an
    # online-softmax merge that rounds differently; the fused CPU prefill skips them all.)
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
            one = bool((r_req[sel] == r_req[sel[0]]).all())
            if one or E > 1:
                # prefill rows: the rows of a request read the same pages, so keys go per request,
                # not per row; pages shared by requests are still dequantized once
                groups, tabs = [], []
                for u in (r_req[sel[:1]] if one else torch.unique(r_req[sel])):
                    mine = sel if one else sel[r_req[sel] == u]
                    nu = min(n, int(need[mine].max()) - c0)
                    tabs.append(req_table[u, c0:c0 + nu])
                    groups.append([sub if one else mine.to(dev), None, nu])
                if len(groups) == 1:     # a request's own pages are distinct: read them in order
                    uniq = tabs[0]
                else:
                    uniq, inv = torch.unique(torch.cat(tabs), return_inverse=True)
                    for g_, idx in zip(groups, torch.split(inv, [g_[2] for g_ in groups])):
                        g_[1] = idx.to(dev)
                p.blocks.append(KeyBlock(True, c0, max(g_[2] for g_ in groups), sub, uniq.to(dev),
                                         groups=[tuple(g_) for g_ in groups]))
                continue
            c = c0 + torch.arange(n)
            t = req_table[r_req[sel]][:, c0:c0 + n]
            t = torch.where(c[None, :] < need[sel][:, None], t, torch.full_like(t, -1))
            uniq, inv = torch.unique(t, return_inverse=True)
            if int(uniq[0]) == -1:   # padding columns read any real page: their keys are masked
                uniq, inv = uniq[1:], (inv - 1).clamp(min=0)
            if inv.numel() == uniq.numel() and torch.equal(inv.flatten(), torch.arange(inv.numel())):
                inv = None           # already in order, nothing shared: no gather
            p.blocks.append(KeyBlock(True, c0, n, sub, uniq.to(dev), None if inv is None else inv.to(dev)))

    # Raw pages: row r sees raw keys from its first query's boundary (raw page lo_r of its request)
    # to its last query (raw page hi_r); its table starts at lo_r, so a prompt's rows each read only
    # their own page(s) of raw keys.
    first_qb = qb[:, 0]
    lo = (first_qb - base[r_req]) // P
    hi = (q_pos.gather(1, last[:, None])[:, 0] - base[r_req]) // P       # inclusive
    span = hi - lo + 1
    n_cols = int(span.max())
    for c0 in range(0, n_cols, kb):
        n = min(kb, n_cols - c0)
        sel = torch.nonzero(span > c0)[:, 0]
        sub = slice(None) if sel.numel() == R else sel
        rq = r_req[sel]
        c = lo[sel][:, None] + c0 + torch.arange(n)[None, :]               # [n_sub, n] raw page of the request
        t = torch.where(c <= hi[sel][:, None], off[rq][:, None] + c, torch.full_like(c, n_raw))
        p.blocks.append(KeyBlock(False, c0, n, sub, t.to(dev), pos0=(base[rq] + lo[sel] * P).to(dev)))
    return _to(p, dev)


def _to(p: Plan, dev) -> Plan:
    for name in ("q_idx", "q_pos", "q_qb", "out_idx", "new_dst"):
        if getattr(p, name) is not None:
            setattr(p, name, getattr(p, name).to(dev))
    for name in ("res", "store", "tail"):
        v = getattr(p, name)
        if v is not None:
            setattr(p, name, tuple(x.to(dev) for x in v))
    return p


def _plan_prefill(tok_req, pos, base, off, rows_t, cfg: OscarConfig, req_to_token, HD: int) -> Prefill:
    """The prefill path's plan: queries of request tok_req [T] at positions pos [T] (in order)."""
    P = cfg.page_size
    dev = req_to_token.device
    T = pos.numel()
    qb = pos // P * P if cfg.prefill == "page" else base[tok_req]
    # groups: runs of queries of one request and one qb (qb only grows along a request's queries)
    starts = torch.ones(T, dtype=torch.bool)
    starts[1:] = (tok_req[1:] != tok_req[:-1]) | (qb[1:] != qb[:-1])
    g_start = torch.nonzero(starts)[:, 0]
    g_end = torch.cat([g_start[1:], torch.tensor([T])])
    gid = torch.cumsum(starts, 0) - 1                                    # [T] group of each query
    g_req, g_qb = tok_req[g_start], qb[g_start]

    # Raw: a group sees raw keys [qb, p], in its raw pages from the one holding qb; a query's slot is its
    # key offset there, so causal attention over each group's pages is exactly the spec's window.
    g_first = off[g_req] + (g_qb - base[g_req]) // P
    g_n = (pos[g_end - 1] - g_qb) // P + 1
    raw = []
    for n in torch.unique(g_n).tolist():
        sel = g_n == n
        local = torch.cumsum(sel, 0) - 1
        tok = None if bool(sel.all()) else torch.nonzero(sel[gid])[:, 0]
        t = slice(None) if tok is None else tok
        slot = local[gid[t]] * (n * P) + (pos - qb)[t]
        if tok is None and slot.numel() == int(sel.sum()) * n * P and torch.equal(slot, torch.arange(T)):
            slot = None                     # whole pages of queries: the queries are the slots, no scatter
        pages = g_first[sel][:, None] + torch.arange(n)[None, :]
        raw.append(tuple(None if x is None else x.to(dev) for x in (pages, slot, tok)))

    # Packed: a group sees its request's pages below qb. Blocks of columns [c0, c0 + n) across requests,
    # n chosen so the block's dequantized keys stay within the scratch bound.
    need = g_qb // P                                                     # packed pages of each group
    blocks = []
    if not bool((need > 0).any()):
        return Prefill(blocks, raw)
    reqs = torch.unique(g_req[need > 0])                                 # requests with packed pages
    calls = {int(u): [] for u in reqs}
    for t0, t1, u, nd in zip(g_start.tolist(), g_end.tolist(), g_req.tolist(), need.tolist()):
        if nd:
            calls[u].append((t0, t1, nd * P))
    r_need = {u: c[-1][2] // P for u, c in calls.items()}
    n_packed = max(r_need.values())
    cols = (torch.arange(n_packed) * P).to(dev)
    req_table = (req_to_token[rows_t[reqs].to(dev)[:, None], cols[None, :]] // P).to(torch.int64).cpu()
    row_of = {int(u): i for i, u in enumerate(reqs)}
    c0 = 0
    while c0 < n_packed:
        act = [u for u in calls if r_need[u] > c0]
        n = min(max(1, SCRATCH_ELEMS // (len(act) * P * HD)), n_packed - c0)
        tabs, entries = [], []
        for u in act:
            nu = min(n, r_need[u] - c0)
            tabs.append(req_table[row_of[u], c0:c0 + nu])
            end = (c0 + nu) * P
            entries.append([None, nu, [(t0, t1, min(kq, end) - c0 * P) for t0, t1, kq in calls[u] if kq > c0 * P]])
        table = torch.cat(tabs)
        uniq, inv = torch.unique(table, return_inverse=True)
        if uniq.numel() == table.numel():   # nothing shared: each request's pages are a run, no gather
            at = 0
            for en in entries:
                en[0], at = at, at + en[1]
        else:                               # pages shared by requests: dequantized once, gathered per request
            table = uniq
            for en, idx in zip(entries, torch.split(inv, [en[1] for en in entries])):
                en[0] = idx.to(dev)
        blocks.append(PackedBlock(c0, n, table.to(dev), [tuple(en) for en in entries]))
        c0 += n
    return Prefill(blocks, raw)


def _plan_decode(rows_t, pre, cfg: OscarConfig, req_to_token, Hq: int, HD: int) -> Decode:
    """The decode path's plan: request rows rows_t [B], each adding the token at position pre [B]."""
    P = cfg.page_size
    dev = req_to_token.device
    B = rows_t.numel()
    n_pk = pre // P                          # packed pages: every page before the token's own
    slot = pre - n_pk * P
    R = int(slot.max()) + 1
    vis = torch.arange(R)[None, :] <= slot[:, None]
    done = torch.nonzero(slot == P - 1)[:, 0]
    store = None
    if done.numel():
        ids = req_to_token[rows_t[done].to(dev), (n_pk[done] * P).to(dev)] // P
        store = (rows_t[done].to(dev), ids.to(torch.int64))
    blocks = []
    n_max = int(n_pk.max())
    if n_max:
        cols = (torch.arange(n_max) * P).to(dev)
        req_table = (req_to_token[rows_t.to(dev)[:, None], cols[None, :]] // P).to(torch.int64).cpu()
        # pages per block: the pairs' dequantized keys (and the logits) within the scratch bound
        kb = max(1, SCRATCH_ELEMS // (B * P * max(HD, Hq)))
        for c0 in range(0, n_max, kb):
            n = min(kb, n_max - c0)
            # the first block covers every request (the raw keys join it); later ones those still reading
            sel = torch.arange(B) if c0 == 0 else torch.nonzero(n_pk > c0)[:, 0]
            loc, col = _ranges((n_pk[sel] - c0).clamp(0, n))
            req = sel[loc]
            ids = req_table[req, c0 + col]
            uniq, inv = torch.unique(ids, return_inverse=True)
            table, inverse = (ids, None) if uniq.numel() == ids.numel() else (uniq, inv.to(dev))
            blocks.append(DecodeBlock(n, slice(None) if sel.numel() == B else sel.to(dev), table.to(dev),
                                      inverse, req.to(dev), loc.to(dev), col.to(dev)))
    return Decode(rows_t.to(dev), slot.to(dev), vis.to(dev), store, blocks)


def forward(p: Plan, q, k, v, pages, res_k, res_v, cfg: OscarConfig, sm_scale: float, store_fn):
    """One layer: q [T, Hq, D], k/v [T, H, D] of this step -> out [T, Hq, D] fp32.

    Writes the pool first (completed pages through store_fn(k, v, page_ids, pages, cfg), the new
    partial pages into the residual rows), then attends, so a query reads its earlier pages packed.
    """
    if p.decode is not None:
        return _attend_decode(p.decode, q, k, v, pages, res_k, res_v, cfg, sm_scale, store_fn)
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
    if p.prefill is not None:
        return _attend_prefill(p, q, raw_k, raw_v, pages, cfg, sm_scale)

    R, E = p.q_idx.shape
    # Head-major throughout ([H, rows, E, g, ...]): every einsum below is a plain batched matmul over
    # H (or H x rows) whose result needs no permuting copy. The logits are scaled after the product,
    # as the spec does (folding scale or norm into q or k would round differently, and the server's
    # greedy answers on knife-edge prompts follow such roundings).
    qpad = torch.cat([q, q.new_zeros((1, Hq, D))])[p.q_idx]              # [R, E, Hq, D]
    qf = qpad.float().view(R, E, H, g, D).permute(2, 0, 1, 3, 4).contiguous()
    qr = None
    if any(b.packed for b in p.blocks):
        qr = rotate_queries(qpad, cfg).view(R, E, H, g, D).permute(2, 0, 1, 3, 4).contiguous()
    m = torch.full((H, R, E, g), float("-inf"), device=q.device)
    l = torch.zeros((H, R, E, g), device=q.device)
    acc = torch.zeros((H, R, E, g, D), device=q.device)

    def update(sub, s, vis, pv):
        """Online-softmax step of rows `sub` over one block's logits s [H, n_sub, E, g, K] (visible
        where vis [n_sub, E, K]); pv(prob) -> [H, n_sub, E, g, D]."""
        s.masked_fill_(~vis[None, :, :, None, :], float("-inf"))
        m_old = m[:, sub]
        m_new = torch.maximum(m_old, s.amax(-1))
        m_use = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # all masked so far
        prob = s.sub_(m_use[..., None]).exp_()                          # in place: s is not needed again
        corr = torch.exp(m_old - m_use)
        l[:, sub] = l[:, sub] * corr + prob.sum(-1)
        acc[:, sub] = acc[:, sub] * corr[..., None] + pv(prob)
        m[:, sub] = m_new

    for b in p.blocks:
        n_sub = p.q_idx[b.sub].shape[0]
        kpos = (b.c0 * P + torch.arange(b.n * P, device=q.device))
        if b.packed:
            fields = {f: pages[f][b.table] for f in FIELDS}
            if b.groups is not None:         # keys shared by a request's rows (and pages by requests): once
                kq, norm, vq = _dequant(fields, cfg.bits, 1, token_major_keys=True)
                norm, vq = norm.view(-1, P), vq.view(H, -1, P, D)
                for sub, idx, nu in b.groups:
                    kg, vg, ng = (kq, vq, norm) if idx is None else (
                        kq.view(-1, P, H, D)[idx].view(-1, H, D), vq[:, idx], norm[idx])
                    s = torch.einsum("hregd,khd->hregk", qr[:, sub], kg)
                    s.mul_((ng * sm_scale).view(1, 1, 1, 1, nu * P))
                    vg = vg.reshape(H, nu * P, D)
                    update(sub, s, kpos[None, None, :nu * P] < p.q_qb[sub][:, :, None],
                           lambda prob, vg=vg: torch.matmul(prob.view(H, -1, nu * P), vg).view(*prob.shape[:-1], D))
                continue
            if b.inverse is not None:        # pages shared by rows: dequantized once, gathered per row
                kq, norm, vq = _dequant(fields, cfg.bits, 1)
                kq = kq.view(H, D, -1, P)[:, :, b.inverse].permute(0, 2, 1, 3, 4).reshape(H, n_sub, D, b.n * P)
                vq = vq.view(H, -1, P, D)[:, b.inverse].reshape(H, n_sub, b.n * P, D)
                norm = norm.view(-1, P)[b.inverse].view(n_sub, -1)
            else:
                kq, norm, vq = _dequant(fields, cfg.bits, n_sub)
            qs = qr[:, b.sub].reshape(H, n_sub, E * g, D)
            s = torch.matmul(qs, kq).view(H, n_sub, E, g, b.n * P)
            s.mul_((norm * sm_scale).view(1, n_sub, 1, 1, b.n * P))
            update(b.sub, s, kpos[None, None, :] < p.q_qb[b.sub][:, :, None],
                   lambda prob: torch.matmul(prob.view(H, n_sub, E * g, -1), vq).view(H, n_sub, E, g, D))
        else:
            kr = raw_k[b.table].view(n_sub, b.n * P, H, D).float()
            vals = raw_v[b.table].view(n_sub, b.n * P, H, D).float()
            s = torch.einsum("hregd,rkhd->hregk", qf[:, b.sub], kr).mul_(sm_scale)
            kp = b.pos0[:, None, None] + kpos[None, None, :]               # [n_sub, 1, n*P]
            update(b.sub, s, (kp >= p.q_qb[b.sub][:, :, None]) & (kp <= p.q_pos[b.sub][:, :, None]),
                   lambda prob: torch.einsum("hregk,rkhd->hregd", prob, vals))
    out = (acc / l.clamp_min(torch.finfo(torch.float32).tiny)[..., None]).permute(1, 2, 0, 3, 4)
    return out.reshape(R * E, Hq, D)[p.out_idx]


def _merge_(out, lse, o, lse_o):
    """Merge a partial attention (o, lse_o) into (out, lse) in place by their log-sum-exps."""
    m = torch.logaddexp(lse, lse_o)
    out.mul_(torch.exp(lse - m)[..., None]).add_(o * torch.exp(lse_o - m)[..., None])
    lse.copy_(m)


def _attend_decode(d: Decode, q, k, v, pages, res_k, res_v, cfg: OscarConfig, sm_scale: float, store_fn):
    """The decode path (see the module doc): q [B, Hq, D], k/v [B, H, D] -> out [B, Hq, D] fp32.

    Head-major throughout ([H, requests, g, ...]): every product is a plain batched matmul."""
    B, Hq, D = q.shape
    H = k.shape[1]
    g = Hq // H
    P = res_k.shape[1]
    res_k[d.rows, d.slot] = k.to(res_k.dtype)
    res_v[d.rows, d.slot] = v.to(res_v.dtype)
    if d.store is not None:
        store_fn(res_k[d.store[0]], res_v[d.store[0]], d.store[1], pages, cfg)
    R = d.vis.shape[1]
    f32 = dict(dtype=torch.float32, memory_format=torch.contiguous_format)
    qf = q.view(B, H, g, D).transpose(0, 1).to(**f32)                       # [H, B, g, D]
    kr = res_k[d.rows, :R].permute(2, 0, 3, 1).to(**f32)                   # [H, B, D, R]
    vr = res_v[d.rows, :R].permute(2, 0, 1, 3).to(**f32)                   # [H, B, R, D]
    s_raw = torch.matmul(qf, kr).mul_(sm_scale).masked_fill_(~d.vis[None, :, None, :], float("-inf"))
    if not d.blocks:
        return torch.matmul(torch.softmax(s_raw, -1), vr).transpose(0, 1).reshape(B, Hq, D)
    # every query of a KV head rotated by one matmul with the Hadamard matrix (as the prefill's)
    qr = torch.matmul(qf, _hadamard(D, q.device)) if cfg.rotate else qf
    out = lse = None
    for i, b in enumerate(d.blocks):
        n_sub, nP = (B if isinstance(b.sub, slice) else b.sub.numel()), b.n * P
        fields = {f: pages[f].index_select(0, b.table) for f in FIELDS}     # (faster than indexing)
        kq, vq = _keys(fields, cfg.bits), _values(fields, cfg.bits)        # [U, H, G, D, 32], [U, H, P, D]
        norm = fields["k_norm"].float()                                     # [U, P]
        if b.inverse is not None:             # pages shared by requests: dequantized once, gathered per pair
            kq, vq, norm = kq[b.inverse], vq[b.inverse], norm[b.inverse]
        M, _, G = kq.shape[:3]
        # each pair's logits, scaled after the product as the spec does: [M, H, G, g, 32]
        s = torch.matmul(qr[:, b.req].transpose(0, 1).unsqueeze(2), kq)
        s.mul_((norm * sm_scale).view(M, 1, G, 1, K_GROUP))
        lg = qf.new_full((H, n_sub, g, nP + (R if i == 0 else 0)), float("-inf"))
        lg[..., :nP].view(H, n_sub, g, b.n, G, K_GROUP)[:, b.loc, :, b.col] = s.transpose(2, 3)
        if i == 0:
            lg[..., nP:] = s_raw
        if len(d.blocks) == 1:
            prob, l_b = torch.softmax(lg, -1), None
        else:
            l_b = torch.logsumexp(lg, -1)
            prob = torch.exp(lg - l_b[..., None])
        pp = prob[..., :nP].view(H, n_sub, g, b.n, P)[:, b.loc, :, b.col]     # [M, H, g, P]
        o = torch.matmul(prob[..., nP:], vr) if i == 0 else prob.new_zeros((H, n_sub, g, D))
        o.index_add_(1, b.loc, torch.matmul(pp, vq).transpose(0, 1))
        if i == 0:
            out, lse = o, l_b
        else:                                 # merged into the requests this block covers
            os_, ls = out[:, b.sub], lse[:, b.sub]   # views for a slice, copies for an index
            _merge_(os_, ls, o, l_b)
            if not isinstance(b.sub, slice):
                out[:, b.sub], lse[:, b.sub] = os_, ls
    return out.transpose(0, 1).reshape(B, Hq, D)


def _attend_prefill(p: Plan, q, raw_k, raw_v, pages, cfg: OscarConfig, sm_scale: float):
    """The prefill path (see the module doc): each qb group's raw part, then its packed parts, through
    torch's fused CPU attention (fp32), merged into the output by their log-sum-exps as they come (each
    merge on one group's queries, while they are in cache)."""
    P, pf = p.P, p.prefill
    T, Hq, D = q.shape
    H = raw_k.shape[2]
    g = Hq // H
    qf = q.float()
    out = lse = None
    for pg, slot, tok in pf.raw:
        G, n = pg.shape
        S = n * P
        kr = raw_k[pg].view(G, S, H, D).float().transpose(1, 2)          # [G, H, S, D]
        vr = raw_v[pg].view(G, S, H, D).float().transpose(1, 2)
        if slot is None:
            qs = qf
        else:                                                             # each query at its key offset
            qs = qf.new_zeros((G * S, Hq, D))
            qs[slot] = qf if tok is None else qf[tok]
        o, l = _flash(qs.view(G, S, Hq, D).transpose(1, 2), kr, vr, is_causal=True, scale=sm_scale)
        o, l = o.transpose(1, 2).reshape(G * S, Hq, D), l.transpose(1, 2).reshape(G * S, Hq)
        if slot is not None:
            o, l = o[slot], l[slot]
        if tok is None:
            out, lse = o, l
        else:
            if out is None:
                out, lse = qf.new_empty((T, Hq, D)), qf.new_empty((T, Hq))
            out[tok], lse[tok] = o, l
    if pf.blocks:
        # every query of a KV head as rows of one [T, g, D] block, rotated once for all packed blocks by one
        # matmul with the Hadamard matrix (the butterfly's result up to rounding, several times faster)
        qh = q.view(T, H, g, D).transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format)
        qr_all = torch.matmul(qh, _hadamard(D, q.device)) if cfg.rotate else qh      # [H, T, g, D]
    for b in pf.blocks:
        kq, vq = _dequant_kv({f: pages[f].index_select(0, b.table) for f in FIELDS}, cfg.bits)
        for at, nu, calls in b.reqs:
            if isinstance(at, int):
                ku, vu = kq[:, at * P:(at + nu) * P], vq[:, at * P:(at + nu) * P]
            else:
                ku, vu = (x.view(H, -1, P, D)[:, at].view(H, nu * P, D) for x in (kq, vq))
            for t0, t1, L in calls:
                # the group's queries of a KV head as one [n * g, D] matrix (no mask: they all see these keys)
                n = t1 - t0
                qr = qr_all[:, t0:t1].reshape(1, H, n * g, D).contiguous()
                o, l = _flash(qr, ku[None, :, :L], vu[None, :, :L], scale=sm_scale)
                o = o[0].view(H, n, g, D).transpose(0, 1)                 # [n, H, g, D]
                l = l[0].view(H, n, g).transpose(0, 1)
                _merge_(out[t0:t1].view(n, H, g, D), lse[t0:t1].view(n, H, g), o, l)
    return out
