"""The backend's batched paths (plan once per batch; per layer the residual writes, one page store, one
kernel launch) against its per-request torch path, on a fake batch driven through forward_extend /
forward_decode.

Two backends share nothing but their inputs: both prefill the same requests in two chunks (the
second starts mid-page, so it reads the residual the first left), then decode the same tokens for a
few steps; one runs the batched paths (the CUDA kernels on a GPU; the wrapper's torch twin on the CPU,
which checks the indexing alone), one the per-request path. The batch is ragged, GQA, has a request
completing a page on the first step (s % P == 0), one opening a page, one with no packed page yet, and
request rows that are not in batch order.
"""
from __future__ import annotations

import types

import pytest
import torch
from fake_sglang import FakePool, batch, decode_batch, fake_layer

from sglang_oscar import batched
from sglang_oscar.backend import OscarAttnBackend, decode_kernels_usable
from sglang_oscar.config import OscarConfig
from sglang_oscar.layout import FIELDS


def make_backend(cfg, pool, req_to_token, dev, kernels):
    return OscarAttnBackend.detached(cfg, pool, req_to_token, dev, kernels)


def run_case(dev, P, Hq, H, D, bits, dtype, prefix_lens, steps=3, n_layers=2, seed=0, prefill="page"):
    gen = torch.Generator(device=dev).manual_seed(seed)
    cfg = OscarConfig(method="oscar", bits=bits, page_size=P, prefill=prefill)
    B = len(prefix_lens)
    R = B + 3
    rows = torch.randperm(R - 1, generator=torch.Generator().manual_seed(seed))[:B].add(1).tolist()  # row 0: padding
    max_len = max(prefix_lens) + steps
    max_pages = -(-max_len // P)
    num_pages = B * max_pages + 2
    # Distinct random pages per request (page 0 is SGLang's sink page); slots = page * P + offset.
    perm = torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(seed + 1))[: B * max_pages] + 1
    req_to_token = torch.zeros((R, max_pages * P + 5), dtype=torch.int32, device=dev)
    for b, row in enumerate(rows):
        pg = perm[b * max_pages:(b + 1) * max_pages]
        slots = (pg[:, None] * P + torch.arange(P)[None, :]).flatten()
        req_to_token[row, : slots.numel()] = slots.to(torch.int32).to(dev)
    pools = [FakePool(n_layers, num_pages, R, P, H, D, bits, dtype, dev) for _ in range(2)]
    fast = make_backend(cfg, pools[0], req_to_token, dev, kernels=True)
    slow = make_backend(cfg, pools[1], req_to_token, dev, kernels=False)
    layers = [fake_layer(i, Hq, H, D) for i in range(n_layers)]

    def rnd(n, h):
        x = torch.randn(n, h, D, generator=gen, device=dev)
        return x.to(dtype).reshape(n, h * D)

    def check(o_fast, o_slow):
        assert torch.isfinite(o_fast).all()
        return (o_fast - o_slow).abs().max().item() / o_slow.abs().max().item()

    # Prefill in two chunks: identical inputs, so (up to rounding) identical pool state.
    worst_ext = 0.0
    first = [n // 2 + 3 if n > 8 else n for n in prefix_lens]
    for done, seq_now in ((None, first), (first, list(prefix_lens))):
        ext = [s - (done[i] if done else 0) for i, s in enumerate(seq_now)]
        keep = [i for i, e in enumerate(ext) if e > 0]
        fb = batch([rows[i] for i in keep], [seq_now[i] for i in keep], [ext[i] for i in keep], False, dev)
        for be in (fast, slow):
            be.init_forward_metadata(fb)
        assert fast._extend_batch is not None and slow._extend_batch is None
        T = sum(ext)
        for layer in layers:
            q, k, v = rnd(T, Hq), rnd(T, H) * 2, rnd(T, H)
            worst_ext = max(worst_ext, check(fast.forward_extend(q, k, v, layer, fb).float(),
                                             slow.forward_extend(q, k, v, layer, fb).float()))

    worst = 0.0
    seq = list(prefix_lens)
    for step in range(steps):
        seq = [s + 1 for s in seq]
        fb = batch(rows, seq, None, True, dev)
        for be in (fast, slow):
            be.init_forward_metadata(fb)
        assert fast._decode_batch is not None and slow._decode_batch is None
        for layer in layers:
            q, k, v = rnd(B, Hq), rnd(B, H) * 2, rnd(B, H)
            worst = max(worst, check(fast.forward_decode(q, k, v, layer, fb).float(),
                                     slow.forward_decode(q, k, v, layer, fb).float()))
    # The state left behind is the same: residual rows byte-equal, every written page byte-equal.
    for i in range(n_layers):
        for row, s in zip(rows, seq):
            tail = s % P
            a, b_ = pools[0].res_k[i][row, :tail], pools[1].res_k[i][row, :tail]
            assert torch.equal(a, b_)
            assert torch.equal(pools[0].res_v[i][row, :tail], pools[1].res_v[i][row, :tail])
            ids = (req_to_token[row, : (s // P) * P : P] // P).long()
            for f in FIELDS:
                assert torch.equal(pools[0].pages[i][f][ids], pools[1].pages[i][f][ids]), (f, row, s)
    return worst_ext, worst, fast


# s % P after the prefill: P-1 (completes a page on step 1), 0 (opens one), small (no packed page),
# a long one, and 2P-1 (a second page completes).
def lens(P):
    return [P - 1, P, 5, 37 * P + 11, 2 * P - 1]


# Decode through the query rows sums exactly as the per-request path does; the CPU's page decode
# (batched.PAGE_DECODE, checked against reference.attend in fp32 in test_batched) sums per page and
# with one softmax, so like extend it may differ by a bf16 rounding of the output.
DECODE_BOUND = {False: 1e-5, True: 2 ** -7}


@pytest.mark.parametrize("page_decode", [False, True])
def test_batched_paths_match_per_request_cpu(page_decode, monkeypatch):
    # On the CPU the wrapper runs its torch twin: this checks the batched indexing (page table gather,
    # residual write, completed-page store, res_len), so it must match to float rounding.
    monkeypatch.setattr(batched, "PAGE_DECODE", page_decode)
    worst_ext, worst, fast = run_case("cpu", 32, 8, 2, 64, 2, torch.bfloat16, lens(32))
    # Extend: one query at a time vs a block of queries per request rounds the fp32 sums differently,
    # then to bf16: at most about one bf16 step of the largest output.
    assert worst_ext < 2 ** -7, worst_ext
    assert worst < DECODE_BOUND[page_decode], worst
    assert not decode_kernels_usable("cpu", fast.cfg, 64)


@pytest.mark.parametrize("page_decode", [False, True])
def test_batched_chunk_prefill_matches_per_request_cpu(page_decode, monkeypatch):
    # Chunk prefill batched: prefix pages through the wrapper's twin (res_len 0, lse), the raw keys
    # through the ragged prefill's twin, merged by lse, against the per-request path that attends
    # to all of them at once. The second chunk starts mid-page, so its raw keys begin with the
    # residual; the 5-token request has no packed prefix (ragged part only).
    monkeypatch.setattr(batched, "PAGE_DECODE", page_decode)
    worst_ext, worst, _ = run_case("cpu", 32, 8, 2, 64, 2, torch.bfloat16, lens(32), prefill="chunk")
    assert worst_ext < 2 ** -7, worst_ext
    assert worst < DECODE_BOUND[page_decode], worst


@pytest.mark.parametrize("P,Hq,H,D,bits,dtype,prefill", [
    (64, 32, 8, 128, 2, torch.bfloat16, "page"),   # Llama-3.1-8B heads
    (64, 9, 3, 64, 2, torch.bfloat16, "page"),     # SmolLM2-135M heads
    (32, 8, 8, 128, 4, torch.float16, "page"),
    (128, 32, 8, 128, 4, torch.bfloat16, "page"),
    (64, 32, 8, 128, 2, torch.bfloat16, "chunk"),
    (64, 9, 3, 64, 2, torch.bfloat16, "chunk"),
    (32, 8, 8, 128, 4, torch.float16, "chunk"),
])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_paths_match_per_request(P, Hq, H, D, bits, dtype, prefill):
    cfg = OscarConfig(method="oscar", bits=bits, page_size=P, prefill=prefill)
    assert decode_kernels_usable("cuda", cfg, D)
    worst_ext, worst, fast = run_case("cuda", P, Hq, H, D, bits, dtype, lens(P), prefill=prefill)
    # Same bound as the kernel tests: fp16 tensor-core arithmetic against the fp32 torch path.
    assert worst_ext < 2.5e-2, worst_ext
    assert worst < 2.5e-2, worst
    print(f"P={P} {Hq}/{H} d={D} int{bits} {dtype} {prefill}: max rel err extend {worst_ext:.2e} "
          f"decode {worst:.2e}")


def test_index_slices_are_realigned_for_the_kernels():
    # page_ids[first:full] in the extend path starts mid-vector when `first` is odd; the kernels
    # check 16-byte alignment, so the wrapper copies such a slice.
    from sglang_oscar.wrapper import _aligned
    ids = torch.arange(10, dtype=torch.int64)[1:]
    assert ids.data_ptr() % 16 and _aligned(ids).data_ptr() % 16 == 0
    assert torch.equal(_aligned(ids), ids)
    whole = torch.arange(10, dtype=torch.int64)
    assert _aligned(whole) is whole


@pytest.mark.parametrize("P,Hq,H,D,dtype", [(64, 32, 8, 128, torch.bfloat16), (32, 9, 3, 64, torch.float16)])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_cuda_graph_replay_matches_eager(P, Hq, H, D, dtype):
    """Decode captured once for B_MAX requests through the backend's graph interface (buffers from
    init_cuda_graph_state, out_graph before capture/replay, in_graph inside), then replayed for
    ragged batches padded as SGLang pads them (request row 0, seq_len = the fill value), with the
    batch's rows and lengths changing between replays and pages completing inside replays. Replay must
    equal the eager kernel path bit for bit (same split count), leave the same pool bytes, and match
    the torch path to the kernels' tolerance."""
    from sglang_oscar.wrapper import store_pages
    dev = "cuda"
    cfg = OscarConfig(method="oscar", bits=2, page_size=P)
    n_layers, B_MAX, R = 2, 8, 12
    # contexts before the first step (row 0 is the padding row); rows 1, 4 and 9 fill a page in a replay
    ctx = {1: P - 2, 2: 5, 3: 40 * P + 3, 4: 2 * P - 1, 5: P, 6: 1000, 7: 7 * P - 3, 8: 130, 9: 3 * P - 1,
           10: 17, 11: 600}
    schedule = [[1, 2, 3], [3, 4, 5, 6, 7, 8, 9, 10], [11, 1, 4, 9, 5], [2, 6], [1, 2, 3, 4, 5, 6, 7, 8],
                [9, 10, 11, 3]]
    max_pages = (max(ctx.values()) + len(schedule)) // P + 2
    num_pages = R * max_pages + 2
    perm = torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(1))[: R * max_pages] + 1
    req_to_token = torch.zeros((R, max_pages * P), dtype=torch.int32, device=dev)
    for row in ctx:
        pg = perm[row * max_pages:(row + 1) * max_pages]
        req_to_token[row] = (pg[:, None] * P + torch.arange(P)[None, :]).flatten().to(torch.int32).to(dev)
    pools = [FakePool(n_layers, num_pages, R, P, H, D, 2, dtype, dev) for _ in range(3)]
    gen = torch.Generator(device=dev).manual_seed(2)
    for row, L in ctx.items():       # the same prefilled state in every pool
        n = L // P
        ids = (req_to_token[row, : n * P: P] // P).long()
        for i in range(n_layers):
            k = (torch.randn(L, H, D, generator=gen, device=dev) * 2).to(dtype)
            v = torch.randn(L, H, D, generator=gen, device=dev).to(dtype)
            for pool in pools:
                pages, res_k, res_v = pool.layer(i)
                if n:
                    store_pages(k[: n * P].view(n, P, H, D), v[: n * P].view(n, P, H, D), ids, pages, cfg)
                res_k[row, : L - n * P] = k[n * P:]
                res_v[row, : L - n * P] = v[n * P:]
    heads = (Hq, H, D, dtype)
    graph_be = OscarAttnBackend.detached(cfg, pools[0], req_to_token, dev, True, heads)
    eager_be = OscarAttnBackend.detached(cfg, pools[1], req_to_token, dev, True, heads)
    torch_be = OscarAttnBackend.detached(cfg, pools[2], req_to_token, dev, False)
    layers = [fake_layer(i, Hq, H, D) for i in range(n_layers)]

    # SGLang's side: static inputs of the largest batch, padded lanes = row 0 with the fill value.
    graph_be.init_cuda_graph_state(B_MAX, B_MAX)
    fill = graph_be.get_cuda_graph_seq_len_fill_value()
    rpi = torch.zeros(B_MAX, dtype=torch.int64, device=dev)
    sl = torch.full((B_MAX,), fill, dtype=torch.int64, device=dev)
    qb = torch.zeros(B_MAX, Hq * D, dtype=dtype, device=dev)
    kb = torch.zeros(B_MAX, H * D, dtype=dtype, device=dev)
    vb = torch.zeros(B_MAX, H * D, dtype=dtype, device=dev)
    fb = types.SimpleNamespace(req_pool_indices=rpi, seq_lens=sl,
                               forward_mode=types.SimpleNamespace(is_decode=lambda: True,
                                                                  is_decode_or_idle=lambda: True))

    def step():
        graph_be.init_forward_metadata_in_graph(fb)
        return [graph_be.forward_decode(qb, kb, vb, layer, fb) for layer in layers]

    graph_be.init_forward_metadata_out_graph(fb, in_capture=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()                       # warm-up, as SGLang's runner does (padding lanes only)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    graph_splits = graph_be._decode_batch.splits

    cur = dict(ctx)
    worst = 0.0
    for rows in schedule:
        B = len(rows)
        seq = [cur[r] + 1 for r in rows]
        q = torch.randn(B, Hq * D, generator=gen, device=dev).to(dtype)
        k = (torch.randn(B, H * D, generator=gen, device=dev) * 2).to(dtype)
        v = torch.randn(B, H * D, generator=gen, device=dev).to(dtype)
        rpi.zero_()
        sl.fill_(fill)
        rpi[:B] = torch.tensor(rows, device=dev)
        sl[:B] = torch.tensor(seq, device=dev)
        for buf, x in ((qb, q), (kb, k), (vb, v)):
            buf.zero_()
            buf[:B] = x
        graph_be.init_forward_metadata_out_graph(fb)   # replay: host-side only
        graph.replay()
        got = [o[:B].clone() for o in outs]

        efb = decode_batch(rows, seq, dev)
        eager_be.init_forward_metadata(efb)
        eager_be._decode_batch.splits = graph_splits    # the same schedule as the captured graph
        torch_be.init_forward_metadata(efb)
        for i, layer in enumerate(layers):
            want = eager_be.forward_decode(q, k, v, layer, efb)
            ref = torch_be.forward_decode(q, k, v, layer, efb).float()
            assert torch.equal(got[i], want), f"replay != eager at rows {rows}, layer {i}"
            worst = max(worst, float((got[i].float() - ref).abs().max() / ref.abs().max()))
        for r in rows:
            cur[r] += 1
    assert worst < 2.5e-2, worst
    # The pools the replays and the eager path wrote are the same bytes (padding row 0 aside).
    for i in range(n_layers):
        for row, L in cur.items():
            for a, b in ((pools[0].res_k[i], pools[1].res_k[i]), (pools[0].res_v[i], pools[1].res_v[i])):
                assert torch.equal(a[row, : L % P], b[row, : L % P]), (row, L)
            ids = (req_to_token[row, : (L // P) * P: P] // P).long()
            for f in FIELDS:
                assert torch.equal(pools[0].pages[i][f][ids], pools[1].pages[i][f][ids]), (f, row, L)
    print(f"graph P={P} {Hq}/{H} d={D} {dtype}: splits {graph_splits}, max rel err vs torch path {worst:.2e}")
