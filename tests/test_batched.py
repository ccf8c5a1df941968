"""The batched torch path (batched.py) against the per-request spec (reference.attend over pages packed
by quant.store_pages), on random ragged batches: decode and prefill (and both in one batch), page and
chunk prefill, GQA, pages completing mid-step, requests sharing packed pages, and key blocks small
enough that the online softmax, the log-sum-exp merges and the causal skipping run over many blocks.
Prefill runs both ways: fused (the CPU's) and in query rows (other devices', here with FUSED_PREFILL off);
decode likewise: page by page (the CPU's) and in query rows (PAGE_DECODE off).

Each case keeps the whole K/V history of every request, so the reference needs no pool at all: its
pages are packed from the history, its raw keys are the history's tail.
"""
from __future__ import annotations

import pytest
import torch

from sglang_oscar import batched, layout, quant
from sglang_oscar.backend import store
from sglang_oscar.config import OscarConfig
from sglang_oscar.layout import FIELDS
from sglang_oscar.reference import attend, boundaries


class Case:
    """Requests with a K/V history in a pool: rows out of order, distinct pages, optionally one request
    whose first pages are another's (a radix hit)."""

    def __init__(self, cfg, Hq, H, D, max_len, n_req, seed, share=False):
        P = cfg.page_size
        self.cfg, self.Hq, self.H, self.D = cfg, Hq, H, D
        self.gen = torch.Generator().manual_seed(seed)
        R = n_req + 3
        self.rows = (torch.randperm(R - 1, generator=self.gen)[:n_req] + 1).tolist()
        max_pages = -(-max_len // P)
        num_pages = n_req * max_pages + 2
        perm = torch.randperm(num_pages - 1, generator=self.gen)[: n_req * max_pages] + 1
        self.req_to_token = torch.zeros((R, max_pages * P + 3), dtype=torch.int32)
        for b, row in enumerate(self.rows):
            pg = perm[b * max_pages:(b + 1) * max_pages]
            self.req_to_token[row, : max_pages * P] = (pg[:, None] * P + torch.arange(P)).flatten().to(torch.int32)
        self.k = [torch.randn(max_len, H, D, generator=self.gen).to(torch.bfloat16) * 2 for _ in range(n_req)]
        self.v = [torch.randn(max_len, H, D, generator=self.gen).to(torch.bfloat16) for _ in range(n_req)]
        if share:  # request 1 starts with request 0's first two pages (same tokens, same pool pages)
            self.k[1][: 2 * P], self.v[1][: 2 * P] = self.k[0][: 2 * P], self.v[0][: 2 * P]
            self.req_to_token[self.rows[1], : 2 * P] = self.req_to_token[self.rows[0], : 2 * P]
        self.pages = {f: torch.zeros((num_pages, *s), dtype=dt)
                      for f, (s, dt) in layout.page_shapes(P, H, D, cfg.bits).items()}
        self.res_k = torch.zeros((R, P, H, D), dtype=torch.bfloat16)
        self.res_v = torch.zeros((R, P, H, D), dtype=torch.bfloat16)
        self.len = [0] * n_req

    def page_ids(self, b, n):
        return (self.req_to_token[self.rows[b], : n * self.cfg.page_size: self.cfg.page_size] // self.cfg.page_size).long()

    def step(self, ext):
        """Run one batched step that adds ext[b] tokens to request b (0 = not in the batch); check the
        output against the reference and the pool state against packing the history directly."""
        cfg, P, Hq, H, D = self.cfg, self.cfg.page_size, self.Hq, self.H, self.D
        idx = [b for b, e in enumerate(ext) if e > 0]
        prefix = [self.len[b] for b in idx]
        ext = [ext[b] for b in idx]
        q = torch.randn(sum(ext), Hq, D, generator=self.gen).to(torch.bfloat16)
        k = torch.cat([self.k[b][p:p + e] for b, p, e in zip(idx, prefix, ext)])
        v = torch.cat([self.v[b][p:p + e] for b, p, e in zip(idx, prefix, ext)])
        plan = batched.plan([self.rows[b] for b in idx], prefix, ext, cfg, self.req_to_token, Hq, H, D)
        out = batched.forward(plan, q, k, v, self.pages, self.res_k, self.res_v, cfg, D ** -0.5, store)
        assert out.dtype == torch.float32 and out.shape == q.shape
        start, worst = 0, 0.0
        for b, pre, e in zip(idx, prefix, ext):
            seq = pre + e
            self.len[b] = seq
            full, base = seq // P, pre // P * P
            # pool state: every full page packed exactly as the history packs; the residual is the tail
            if full:
                want = quant.store_pages(self.k[b][: full * P].view(full, P, H, D),
                                         self.v[b][: full * P].view(full, P, H, D), cfg)
                ids = self.page_ids(b, full)
                for f in FIELDS:
                    assert torch.equal(self.pages[f][ids], want[f]), (f, b)
            row = self.rows[b]
            assert torch.equal(self.res_k[row, : seq - full * P], self.k[b][full * P:seq])
            assert torch.equal(self.res_v[row, : seq - full * P], self.v[b][full * P:seq])
            # output: the spec, one request at a time
            q_pos = torch.arange(pre, seq)
            qb = boundaries(q_pos, pre, cfg)
            need = int(qb.max()) // P
            pk = quant.store_pages(self.k[b][: need * P].view(need, P, H, D),
                                   self.v[b][: need * P].view(need, P, H, D), cfg) if need else None
            ref = attend(q[start:start + e], q_pos, qb, pk, self.k[b][base:seq], self.v[b][base:seq], base,
                         cfg, D ** -0.5)
            got = out[start:start + e]
            worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
            start += e
        assert worst < 1e-5, worst
        return plan


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("prefill", ["page", "chunk"])
@pytest.mark.parametrize("bits,Hq,H,D,P", [(2, 8, 2, 64, 32), (4, 9, 3, 64, 64), (2, 4, 4, 128, 32)])
def test_prefill_chunks_then_decode_match_reference(monkeypatch, fused, prefill, bits, Hq, H, D, P):
    monkeypatch.setattr(batched, "FUSED_PREFILL", fused)
    monkeypatch.setattr(batched, "PAGE_DECODE", fused)
    cfg = OscarConfig(method="oscar", bits=bits, page_size=P, prefill=prefill)
    c = Case(cfg, Hq, H, D, max_len=6 * P + 8, n_req=5, seed=bits * 100 + P + len(prefill))
    # ragged first chunks (one empty: that request joins later), then chunks starting mid-page,
    # then decode steps where some requests complete a page
    c.step([P - 1, 3 * P + 5, 1, 0, 2 * P])
    c.step([P + 2, 1, 2 * P - 1, 5, P])
    for _ in range(3):
        c.step([1, 1, 1, 1, 1])


def test_decode_completing_and_opening_pages_match_reference():
    cfg = OscarConfig(method="oscar", bits=2, page_size=32)
    c = Case(cfg, 8, 2, 64, max_len=200, n_req=4, seed=7)
    c.step([31, 32, 63, 100])          # next decode token: completes a page, opens one, completes, mid
    for _ in range(4):
        c.step([1, 1, 1, 1])
    c.step([0, 1, 0, 1])               # a subset of the batch


@pytest.mark.parametrize("page_decode", [True, False])
@pytest.mark.parametrize("bits,Hq,H,D,P", [(2, 8, 2, 64, 32), (4, 9, 3, 64, 64), (2, 4, 4, 128, 64),
                                           (4, 8, 2, 128, 128), (2, 6, 3, 32, 32)])
def test_decode_matrix_matches_reference(monkeypatch, page_decode, bits, Hq, H, D, P):
    # Ragged decode batches against the single-request spec, across bits, page sizes and head shapes:
    # requests with no packed page yet, one whose token starts a page (nothing in its residual before
    # it), one completing a page, long and short side by side, a lone request, and a subset of the batch.
    monkeypatch.setattr(batched, "PAGE_DECODE", page_decode)
    cfg = OscarConfig(method="oscar", bits=bits, page_size=P)
    c = Case(cfg, Hq, H, D, max_len=5 * P + 4, n_req=5, seed=bits * 1000 + P + D + Hq)
    c.step([3, P, 2 * P - 1, 4 * P + 1, 0])      # decode next: no packed page, opens a page, completes, long
    for _ in range(2):
        plan = c.step([1, 1, 1, 1, 0])
        assert (plan.decode is not None) == page_decode
    c.step([0, 0, 0, 1, 0])                       # a lone request
    c.step([1, 0, 1, 0, 0])
    c.step([0, 0, 0, 0, 2])                       # a late prompt (prefill), then it decodes alongside
    c.step([1, 1, 1, 1, 1])


@pytest.mark.parametrize("kind", ["kivi", "quarot"])
def test_page_decode_other_methods_and_raw_only(kind):
    cfg = OscarConfig(method=kind, bits=4, page_size=32)
    c = Case(cfg, 8, 2, 64, max_len=100, n_req=3, seed=21)
    c.step([5, 1, 31])
    dec = c.step([1, 1, 1]).decode              # no request has a packed page yet: raw keys only
    assert dec is not None and not dec.blocks and dec.store is not None   # request 2 completes its page
    assert c.step([1, 1, 1]).decode.blocks      # now request 2 reads one


@pytest.mark.parametrize("prefill", ["page", "chunk"])
def test_many_key_blocks_and_query_rows(monkeypatch, prefill):
    monkeypatch.setattr(batched, "FUSED_PREFILL", False)   # the query-row path
    monkeypatch.setattr(batched, "PAGE_DECODE", False)
    # Tiny blocks: keys stream over many blocks (online softmax), query rows are short, and most
    # blocks involve only some rows (causal skipping); the result must not change.
    monkeypatch.setattr(batched, "SCRATCH_ELEMS", 1)
    monkeypatch.setattr(batched, "QUERY_ROW", 5)
    cfg = OscarConfig(method="oscar", bits=2, page_size=32, prefill=prefill)
    c = Case(cfg, 8, 2, 64, max_len=300, n_req=3, seed=11)
    blocks = [b for e in ([70, 3, 150], [40, 33, 1], [1, 1, 1]) for b in c.step(e).blocks]
    assert sum(b.packed for b in blocks) >= 3 and sum(not b.packed for b in blocks) >= 3
    assert any(isinstance(b.sub, torch.Tensor) for b in blocks)


def test_shared_pages_are_dequantized_once_in_rows(monkeypatch):
    monkeypatch.setattr(batched, "FUSED_PREFILL", False)   # the query-row path
    monkeypatch.setattr(batched, "PAGE_DECODE", False)
    cfg = OscarConfig(method="oscar", bits=2, page_size=32)
    c = Case(cfg, 8, 2, 64, max_len=200, n_req=3, seed=3, share=True)
    c.step([2 * 32 + 10, 0, 50])
    # request 1 arrives with request 0's two pages as its cached prefix (a radix hit)
    c.len[1] = 64
    plan = c.step([1, 20, 1])
    shared = set(c.page_ids(0, 2).tolist())
    for b in plan.blocks:
        if b.packed:
            ids = b.table.tolist()
            assert len(ids) == len(set(ids))          # each needed page once per block
            assert shared <= set(ids)


@pytest.mark.parametrize("prefill", ["page", "chunk"])
def test_one_prompt_reads_its_pages_once_in_rows(monkeypatch, prefill):
    monkeypatch.setattr(batched, "FUSED_PREFILL", False)   # the query-row path
    monkeypatch.setattr(batched, "PAGE_DECODE", False)
    # One long chunk of one request over a cached prefix that ends mid-page: its many query rows read
    # the same packed pages, dequantized once for all of them (not copied per row); in page prefill
    # each row reads only the raw pages its own queries fall in, not the whole chunk's.
    P = 64
    cfg = OscarConfig(method="oscar", bits=2, page_size=P, prefill=prefill)
    c = Case(cfg, 8, 2, 64, max_len=12 * P, n_req=2, seed=13)
    c.step([3 * P + 7, 0])
    plan = c.step([8 * P, 0])
    packed = [b for b in plan.blocks if b.packed]
    assert packed and all(b.groups and len(b.groups) == 1 for b in packed)
    assert all(idx is None and len(b.table) == n for b in packed for _, idx, n in b.groups)  # no gathers
    if prefill == "page":
        assert sum(b.n for b in plan.blocks if not b.packed) <= batched.QUERY_ROW // P + 1
    c.step([1, 0])


@pytest.mark.parametrize("prefill", ["page", "chunk"])
def test_many_key_blocks_fused(monkeypatch, prefill):
    # Tiny blocks: packed keys stream over many blocks (decode: online softmax, prefill: log-sum-exp
    # merges), and most blocks involve only some queries (causal skipping); the result must not change.
    monkeypatch.setattr(batched, "SCRATCH_ELEMS", 1)
    cfg = OscarConfig(method="oscar", bits=2, page_size=32, prefill=prefill)
    c = Case(cfg, 8, 2, 64, max_len=300, n_req=3, seed=11)
    pf = [c.step(e).prefill for e in ([70, 3, 150], [40, 33, 1])]
    blocks = [b for x in pf for b in x.blocks]
    assert len(blocks) >= 3 and all(b.n == 1 for b in blocks)
    assert any(b.c0 > 0 and calls for b in blocks for _, _, calls in b.reqs)     # merged after block 0
    if prefill == "chunk":      # ragged raw spans: queries of several spans in one step
        assert any(len(x.raw) > 1 for x in pf)
    dec = c.step([1, 1, 1]).decode
    assert len(dec.blocks) >= 3                                                   # merged after block 0
    assert any(isinstance(b.sub, torch.Tensor) and len(b.sub) < 3 for b in dec.blocks)   # some requests only


def test_page_decode_blocks_over_every_request(monkeypatch):
    # Tiny blocks over requests of equal length: every block covers the whole batch (merged in place),
    # and a page completed in the step is read packed by the next one.
    monkeypatch.setattr(batched, "SCRATCH_ELEMS", 1)
    cfg = OscarConfig(method="oscar", bits=2, page_size=32)
    c = Case(cfg, 8, 2, 64, max_len=200, n_req=2, seed=17)
    c.step([3 * 32 + 30, 3 * 32 + 30])
    dec = c.step([1, 1]).decode
    assert len(dec.blocks) == 3 and all(isinstance(b.sub, slice) for b in dec.blocks)
    assert dec.store is None
    assert c.step([1, 1]).decode.store is not None and len(c.step([1, 1]).decode.blocks) == 4


def test_shared_pages_are_dequantized_once_fused():
    cfg = OscarConfig(method="oscar", bits=2, page_size=32)
    c = Case(cfg, 8, 2, 64, max_len=200, n_req=3, seed=3, share=True)
    c.step([2 * 32 + 10, 0, 50])
    # request 1 arrives with request 0's two pages as its cached prefix (a radix hit)
    c.len[1] = 64
    shared = set(c.page_ids(0, 2).tolist())
    pf = c.step([1, 20, 1]).prefill                  # a prefill batch (with decode tokens in it)
    assert pf.blocks
    for b in pf.blocks:
        ids = b.table.tolist()
        assert len(ids) == len(set(ids))              # each needed page once per block
        assert shared <= set(ids)
        assert all(isinstance(at, torch.Tensor) for at, _, _ in b.reqs)   # gathered per request
    dec = c.step([1, 1, 1]).decode                    # a decode batch
    assert dec is not None and len(dec.blocks) == 1
    for b in dec.blocks:
        ids = b.table.tolist()
        assert len(ids) == len(set(ids))
        assert shared <= set(ids)
        assert b.inverse is not None and len(b.inverse) > len(ids)     # gathered per (request, page) pair


@pytest.mark.parametrize("prefill", ["page", "chunk"])
def test_one_prompt_reads_its_pages_once_fused(prefill):
    # One long chunk of one request over a cached prefix that ends mid-page: its queries read the same
    # packed pages, dequantized once for all of them (in order, not gathered); in page prefill each
    # query group reads only the raw page its queries fall in; chunk prefill calls once per block.
    P = 64
    cfg = OscarConfig(method="oscar", bits=2, page_size=P, prefill=prefill)
    c = Case(cfg, 8, 2, 64, max_len=12 * P, n_req=2, seed=13)
    first = c.step([2 * P, 0]).prefill                # whole pages of queries: they are the slots, no scatter
    assert len(first.raw) == 1 and first.raw[0][1] is None
    c.step([P + 7, 0])
    pf = c.step([8 * P, 0]).prefill
    assert pf.blocks and all(len(b.reqs) == 1 for b in pf.blocks)
    assert all(at == 0 and len(b.table) == nu for b in pf.blocks for at, nu, _ in b.reqs)   # no gathers
    calls = [cl for b in pf.blocks for _, _, cls in b.reqs for cl in cls]
    if prefill == "page":
        assert len(pf.raw) == 1 and pf.raw[0][0].shape[1] == 1
        assert len(calls) == 9                        # one per page with packed pages below it
    else:
        assert len(calls) == len(pf.blocks) == 1
    c.step([1, 0])


@pytest.mark.parametrize("kind", ["kivi", "quarot"])
def test_other_methods_match_reference(kind):
    cfg = OscarConfig(method=kind, bits=2, page_size=32)
    c = Case(cfg, 8, 2, 64, max_len=150, n_req=3, seed=5)
    c.step([40, 64, 7])
    c.step([1, 1, 1])


def test_scratch_is_bounded_in_rows(monkeypatch):
    monkeypatch.setattr(batched, "FUSED_PREFILL", False)
    # A 4k-token chunk over a 16k-token context in 8 KV-head/128-dim shape: every block's logits and
    # dequantized keys stay within the scratch bound, whatever the context.
    cfg = OscarConfig(method="oscar", bits=2, page_size=64)
    P, Hq, H, D = 64, 32, 8, 128
    pre, e = 16384, 4096
    req_to_token = torch.arange(((pre + e) // P + 1) * P, dtype=torch.int32)[None].repeat(2, 1)
    plan = batched.plan([1], [pre], [e], cfg, req_to_token, Hq, H, D)
    R, E = plan.q_idx.shape
    for b in plan.blocks:
        n_sub = plan.q_idx[b.sub].shape[0]
        assert n_sub * E * Hq * b.n * P <= max(batched.SCRATCH_ELEMS, R * E * Hq * P)
        assert n_sub * b.n * P * H * D <= max(batched.SCRATCH_ELEMS, R * P * H * D)
    assert len(plan.blocks) > 2


def test_scratch_is_bounded_fused():
    # A 4k-token chunk over a 16k-token context in 8 KV-head/128-dim shape: every block's dequantized
    # keys stay within the scratch bound, whatever the context.
    cfg = OscarConfig(method="oscar", bits=2, page_size=64)
    P, Hq, H, D = 64, 32, 8, 128
    pre, e = 16384, 4096
    req_to_token = torch.arange(((pre + e) // P + 1) * P, dtype=torch.int32)[None].repeat(2, 1)
    pf = batched.plan([1], [pre], [e], cfg, req_to_token, Hq, H, D).prefill
    for b in pf.blocks:
        assert len(b.table) * P * H * D <= max(batched.SCRATCH_ELEMS, P * H * D)
    assert len(pf.blocks) > 2


def test_partial_prefix_on_a_fresh_row_is_refused():
    # A cached prefix that ends mid-page continues from the row's residual. Row 3 first serves a
    # 40-token prompt (residual: 8 tokens); then SGLang gives row 3 to a new request (its generation
    # moves on). If that request arrived with a 40-token prefix, the residual would be the previous
    # owner's keys: the backend must refuse, not silently attend to them. The same owner continuing
    # mid-page, and a fresh owner whose prefix is page-aligned, are served.
    import types

    from fake_sglang import batch, fake_layer

    from sglang_oscar.backend import OscarAttnBackend

    cfg = OscarConfig(method="oscar", bits=2, page_size=32)
    P, Hq, H, D, R = 32, 8, 2, 64, 5
    pool = types.SimpleNamespace(layer=lambda i: (pages, res_k, res_v))
    pages = {f: torch.zeros((20, *s), dtype=dt) for f, (s, dt) in layout.page_shapes(P, H, D, 2).items()}
    res_k = torch.zeros((R, P, H, D), dtype=torch.bfloat16)
    res_v = torch.zeros_like(res_k)
    req_to_token = torch.arange(R * 4 * P, dtype=torch.int32).view(R, 4 * P) + P
    be = OscarAttnBackend.detached(cfg, pool, req_to_token, "cpu", False)
    be.req_to_token_pool.req_generation = torch.zeros(R, dtype=torch.int64)
    layer = fake_layer(0, Hq, H, D)

    def extend(row, prefix, e):
        fb = batch([row], [prefix + e], [e], False, "cpu")
        be.init_forward_metadata(fb)
        x = torch.randn(e, Hq * D).to(torch.bfloat16)
        return be.forward_extend(x, x[:, : H * D], x[:, : H * D], layer, fb)

    be.req_to_token_pool.req_generation[3] += 1
    extend(3, 0, 40)
    extend(3, 40, 5)                    # the same owner continues mid-page
    be.req_to_token_pool.req_generation[3] += 1
    with pytest.raises(RuntimeError, match="fresh row"):
        extend(3, 45, 3)
    extend(3, 32, 3)                    # a page-aligned prefix on the fresh row is fine
    extend(3, 35, 2)                    # ... and so is its continuation
    with pytest.raises(RuntimeError, match="fresh row"):
        extend(2, 10, 1)                # a row no request ever wrote


@pytest.mark.parametrize("bits", [2, 4])
def test_fast_dequantization_equals_load_pages(bits):
    cfg = OscarConfig(method="oscar", bits=bits, page_size=64)
    k = torch.randn(3, 64, 2, 64).to(torch.bfloat16) * 3
    v = torch.randn(3, 64, 2, 64).to(torch.bfloat16)
    pages = quant.store_pages(k, v, cfg)
    ks, ns, vs = quant.load_pages(pages, bits)
    for rows in (1, 3):     # 3 pages as one request's keys, or as three rows of one page each
        kf, nf, vf = batched._dequant(pages, bits, rows)        # [H, rows, D, n*P], [rows, n*P], [H, rows, n*P, D]
        n = 3 // rows
        assert torch.equal(kf.permute(1, 3, 0, 2).reshape(3, 64, 2, 64), ks)
        assert torch.equal(nf.reshape(3, 64), ns)
        assert torch.equal(vf.permute(1, 2, 0, 3).reshape(3, 64, 2, 64), vs)
        assert kf.shape == (2, rows, 64, n * 64) and vf.shape == (2, rows, n * 64, 64)
    kt, _, _ = batched._dequant(pages, bits, 1, token_major_keys=True)   # [N*P, H, D]
    assert torch.equal(kt.view(3, 64, 2, 64), ks) and kt.is_contiguous()
