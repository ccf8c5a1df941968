"""The extend (prefill) kernel against its torch twin, and its device-side plan against a loop spec.

Kernel cases (CUDA): every output is poisoned (NaN) first. A case is a ragged batch of requests, each
with a cached prefix (its whole pages already packed, its partial page in the residual row) and a
chunk of new tokens; the step runs exactly as the backend does (scratch, store of the completed
pages, residual tail), then the kernel and extend_reference read the same pool and scratch.
  * the cheap axes in full: page {32,64,128} x heads {(32,8),(9,3),(8,8)} x head_dim {64,128} x dtype
    {bf16,fp16} x bits {2,4} x prefill {page,chunk}, chunks cycling over {1,7,64,65,1000} and prefixes
    over {0,64,4095} (rotated per case, batches of 1-3), methods cycling oscar/quarot/kivi; these
    small batches run 64-row CTAs, a slice of them again with 128-row CTAs forced;
  * key splits forced to 1, 2, 7 and 32 over a slice of the matrix, and chat turns (7-128 new tokens
    over 8k-24k cached ones) with the plan's own split;
  * long cases, sampled: 8192-token chunks over prefixes of 0, 4095 and 24k, both modes (128-row CTAs).
Bounds as the decode kernel's (test_kernels_gpu.py says why): max |err| <= 2.5e-2 max |ref|, mean
|err| <= 1e-2 mean |ref|, lse (base 2) within 0.1.
The backend's batched extend against its per-request path: test_backend_gpu.run_case with chunks
that span several query blocks and pages, all through the extend kernel and all through the flash path.
"""
from __future__ import annotations

import itertools
import random

import pytest
import torch

from sglang_oscar import layout
from sglang_oscar.config import OscarConfig
from sglang_oscar.extend import extend_reference, fill_scratch, plan_extend, plan_reference, run_extend
from sglang_oscar.wrapper import store_pages

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
TOL, MEAN_TOL, LSE_TOL = 2.5e-2, 1e-2, 1e-1
METHODS = ("oscar", "quarot", "kivi")


def make_kv(n, H, D, dtype, gen, dev):
    """Keys with per-channel offsets and outlier channels, as test_kernels_gpu.make_kv."""
    k = torch.randn(n, H, D, generator=gen, device=dev) + torch.randn(1, H, D, generator=gen, device=dev) * 2
    k[:, :, :: max(1, D // 8)] *= 6
    return k.to(dtype), torch.randn(n, H, D, generator=gen, device=dev).to(dtype)


def step_case(reqs, P, Hq, H, D, dtype, bits, method, prefill, seed, dev="cuda"):
    """One extend step over `reqs` = [(prefix, ext)]: returns (q, pool, raw_k, raw_v, plan, cfg)."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    cfg = OscarConfig(method=method, bits=bits, page_size=P, prefill=prefill)
    B = len(reqs)
    n_pg = [-(-(a + e) // P) for a, e in reqs]
    num_pages = sum(n_pg) + 1
    perm = (torch.randperm(num_pages - 1, generator=torch.Generator().manual_seed(seed)) + 1).tolist()
    rows = (torch.randperm(B + 2, generator=torch.Generator().manual_seed(seed + 1))[:B] + 1).tolist()
    req_to_token = torch.zeros((B + 3, max(n_pg) * P + 7), dtype=torch.int32, device=dev)
    pool = {f: torch.zeros((num_pages, *s), dtype=dt, device=dev)
            for f, (s, dt) in layout.page_shapes(P, H, D, bits).items()}
    res_k = torch.zeros((B + 3, P, H, D), dtype=dtype, device=dev)
    res_v = torch.zeros_like(res_k)
    new_k, new_v = [], []
    used = 0
    for (pre, e), row, n in zip(reqs, rows, n_pg):
        pages = torch.tensor(perm[used:used + n])
        used += n
        req_to_token[row, : n * P] = (pages[:, None] * P + torch.arange(P)).flatten().to(torch.int32).to(dev)
        k, v = make_kv(pre + e, H, D, dtype, gen, dev)
        full = pre // P
        if full:   # the cached prefix's whole pages, packed by an earlier step
            store_pages(k[: full * P].view(full, P, H, D), v[: full * P].view(full, P, H, D),
                        pages[:full].to(dev), pool, cfg)
        res_k[row, : pre - full * P] = k[full * P: pre]
        res_v[row, : pre - full * P] = v[full * P: pre]
        new_k.append(k[pre:])
        new_v.append(v[pre:])
    plan = plan_extend(torch.tensor(rows, device=dev), torch.tensor([a for a, _ in reqs], device=dev),
                       torch.tensor([e for _, e in reqs], device=dev), [a for a, _ in reqs], [e for _, e in reqs],
                       P, req_to_token)
    raw_k, raw_v = fill_scratch(torch.cat(new_k), torch.cat(new_v), res_k, res_v, plan)
    if plan.store is not None:   # the pages this step completes, packed before attention
        start, ids = plan.store
        idx = (start[:, None] + torch.arange(P, device=dev)).flatten()
        store_pages(raw_k[idx].view(-1, P, H, D), raw_v[idx].view(-1, P, H, D), ids, pool, cfg)
    T = sum(e for _, e in reqs)
    q = torch.randn(T, Hq, D, generator=gen, device=dev).to(dtype)
    return q, pool, raw_k, raw_v, plan, cfg


def check_kernel(reqs, P, Hq, H, D, dtype, bits, method, prefill, seed, splits=None):
    q, pool, raw_k, raw_v, plan, cfg = step_case(reqs, P, Hq, H, D, dtype, bits, method, prefill, seed)
    if splits is not None:   # key splits per query block (None: the plan's own choice)
        plan.splits = splits
    out = torch.full_like(q, float("nan"))
    lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
    run_extend(q, pool, raw_k, raw_v, plan, cfg, D ** -0.5, return_lse=True, out=out, lse=lse)
    ref, ref_lse = extend_reference(q, pool, raw_k, raw_v, plan, cfg, D ** -0.5, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    err = (out.float() - ref.float()).abs()
    rel = err.max().item() / ref.float().abs().max().item()
    mean = err.mean().item() / ref.float().abs().mean().item()
    lse_err = (lse - ref_lse).abs().max().item()
    assert rel <= TOL and mean <= MEAN_TOL and lse_err <= LSE_TOL, (reqs, rel, mean, lse_err)
    return rel, mean, lse_err, plan


CHUNKS = (1, 7, 64, 65, 1000)
PREFIXES = (0, 64, 4095)
MATRIX = list(itertools.product((32, 64, 128), ((32, 8), (9, 3), (8, 8)), (64, 128),
                                (torch.bfloat16, torch.float16), (2, 4), ("page", "chunk")))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("i", range(len(MATRIX)))
def test_extend_kernel_matrix(i):
    P, (Hq, H), D, dtype, bits, prefill = MATRIX[i]
    n = 1 + i % 3
    reqs = [(PREFIXES[(i + j) % 3], CHUNKS[(i * 2 + j) % 5]) for j in range(n)]
    rel, mean, lse_err, plan = check_kernel(reqs, P, Hq, H, D, dtype, bits, METHODS[i % 3], prefill, seed=i)
    print(f"P={P} {Hq}/{H} d={D} {dtype} int{bits} {prefill} {reqs}: rel {rel:.2e} mean {mean:.2e} lse {lse_err:.2e}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("i", range(0, len(MATRIX), 12))
def test_extend_kernel_128_rows(i, monkeypatch):
    # small batches run 64-row CTAs; force the 128-row variant over a slice of the matrix
    import sglang_oscar.extend as extend_mod
    monkeypatch.setattr(extend_mod, "WAVE_CTAS", 0)
    P, (Hq, H), D, dtype, bits, prefill = MATRIX[i]
    reqs = [(PREFIXES[(i + j) % 3], CHUNKS[(i + 2 * j) % 5]) for j in range(1 + (i // 12) % 3)]
    check_kernel(reqs, P, Hq, H, D, dtype, bits, METHODS[(i // 12) % 3], prefill, seed=1000 + i)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("i", range(0, len(MATRIX), 5))
@pytest.mark.parametrize("splits", [1, 2, 7, 32])
def test_extend_kernel_key_splits(i, splits):
    # the same steps with the key splits forced (1: one CTA walks all of a block's keys; 32: most
    # splits of these short steps hold no key at all, and must not disturb the merge)
    P, (Hq, H), D, dtype, bits, prefill = MATRIX[i]
    reqs = [(PREFIXES[(i + 2 * j) % 3], CHUNKS[(i + j) % 5]) for j in range(1 + i % 3)]
    check_kernel(reqs, P, Hq, H, D, dtype, bits, METHODS[i % 3], prefill, seed=2000 + i, splits=splits)


CHAT = [  # a chat turn: a short chunk over a long cached prefix, where the plan splits the keys
    ([(24576, 16)], 64, (32, 8), 128, torch.bfloat16, 2, "page"),
    ([(24576, 128)], 64, (32, 8), 128, torch.bfloat16, 2, "chunk"),
    ([(24576 + 40, 7), (8192 + 3, 64)], 64, (9, 3), 64, torch.float16, 2, "page"),
    ([(24576, 65)], 32, (32, 8), 128, torch.bfloat16, 4, "chunk"),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", range(len(CHAT)))
def test_extend_kernel_chat_turn(case):
    reqs, P, (Hq, H), D, dtype, bits, prefill = CHAT[case]
    rel, mean, lse_err, plan = check_kernel(reqs, P, Hq, H, D, dtype, bits, "oscar", prefill, seed=300 + case)
    blocks, = plan.blocks.values()
    assert blocks.splits > 1   # the split path ran
    print(f"chat {reqs} P={P} {Hq}/{H} d={D} {prefill}: rel {rel:.2e} mean {mean:.2e} lse {lse_err:.2e}")


LONG = [  # (reqs, P, heads, D, dtype, bits, prefill)
    ([(24576, 8192)], 64, (32, 8), 128, torch.bfloat16, 2, "page"),
    ([(24576, 8192)], 64, (32, 8), 128, torch.bfloat16, 2, "chunk"),
    ([(0, 8192)], 128, (9, 3), 64, torch.float16, 4, "chunk"),
    ([(4095, 8192), (64, 1000), (0, 7)], 32, (8, 8), 128, torch.bfloat16, 4, "page"),
    ([(24576 + 17, 8192), (4095, 65)], 64, (9, 3), 64, torch.bfloat16, 2, "chunk"),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", range(len(LONG)))
def test_extend_kernel_long(case):
    reqs, P, (Hq, H), D, dtype, bits, prefill = LONG[case]
    rel, mean, lse_err, plan = check_kernel(reqs, P, Hq, H, D, dtype, bits, "oscar", prefill, seed=100 + case)
    print(f"long {reqs} P={P} {Hq}/{H} d={D} {prefill}: rel {rel:.2e} mean {mean:.2e} lse {lse_err:.2e}")


SCRATCH = [  # (reqs, P, heads, D, dtype): residuals, completed pages and tails of every kind
    ([(0, 7), (64, 1000), (4095, 65)], 64, (32, 8), 128, torch.bfloat16),
    ([(24576 + 40, 16), (31, 1), (5, 200)], 32, (9, 3), 64, torch.float16),
    ([(127, 1), (0, 8192)], 128, (8, 8), 128, torch.bfloat16),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", range(len(SCRATCH)))
def test_scratch_copies_match_twin(case):
    # the copy kernel's scratch and residual tails == the indexed torch copies, bit for bit, with the new
    # K/V strided views into a fused qkv buffer (as the model hands them over); the store reading pages
    # at the scratch's token starts == the store of the gathered pages
    from sglang_oscar.extend import scratch, scratch_tail, write_tail
    reqs, P, (Hq, H), D, dtype = SCRATCH[case]
    dev, B = "cuda", len(reqs)
    gen = torch.Generator(device=dev).manual_seed(case)
    T = sum(e for _, e in reqs)
    qkv = torch.randn(T, (Hq + 2 * H) * D, generator=gen, device=dev).to(dtype)
    k, v = qkv[:, Hq * D:(Hq + H) * D], qkv[:, (Hq + H) * D:]
    res_k = torch.randn(B + 2, P, H, D, generator=gen, device=dev).to(dtype)
    res_v = torch.randn(B + 2, P, H, D, generator=gen, device=dev).to(dtype)
    rows = list(range(1, B + 1))
    width = max(a + e for a, e in reqs) // P * P + P
    req_to_token = (torch.randperm(B * width // P + 3, device=dev)[:B * width // P].view(B, -1, 1) * P
                    + torch.arange(P, device=dev)).view(B, width).to(torch.int32)
    req_to_token = torch.cat([req_to_token[:1], req_to_token])   # row 0 unused
    plan = plan_extend(torch.tensor(rows, device=dev), torch.tensor([a for a, _ in reqs], device=dev),
                       torch.tensor([e for _, e in reqs], device=dev), [a for a, _ in reqs], [e for _, e in reqs],
                       P, req_to_token)
    ref_k, ref_v = fill_scratch(k, v, res_k, res_v, plan)
    raw_k, raw_v = scratch(k, v, res_k, res_v, plan)
    assert torch.equal(raw_k, ref_k) and torch.equal(raw_v, ref_v)
    tk, tv = res_k.clone(), res_v.clone()
    write_tail(ref_k, ref_v, tk, tv, plan)
    scratch_tail(raw_k, raw_v, res_k, res_v, plan)
    # cases 0 and 1 leave partial pages; in case 2 every request ends on a page boundary (no tail launch)
    assert (plan.tail is not None) == any((a + e) % P for a, e in reqs)
    assert torch.equal(res_k, tk) and torch.equal(res_v, tv)
    start, ids = plan.store
    cfg = OscarConfig(bits=2, page_size=P)
    shapes = layout.page_shapes(P, H, D, 2)
    pools = [{f: torch.zeros((int(req_to_token.max()) // P + 1, *s), dtype=dt, device=dev)
              for f, (s, dt) in shapes.items()} for _ in range(2)]
    idx = (start[:, None] + torch.arange(P, device=dev)).flatten()
    store_pages(ref_k[idx].view(-1, P, H, D), ref_v[idx].view(-1, P, H, D), ids, pools[0], cfg)
    store_pages(raw_k, raw_v, ids, pools[1], cfg, tok=start)
    for f in shapes:
        assert torch.equal(pools[0][f], pools[1][f]), f
    assert pools[1]["k_norm"][ids].abs().sum() > 0   # the pages were written


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("P,Hq,H,D,bits,dtype,prefill", [
    (64, 32, 8, 128, 2, torch.bfloat16, "page"),
    (64, 32, 8, 128, 2, torch.bfloat16, "chunk"),
    (32, 9, 3, 64, 4, torch.float16, "chunk"),
    (128, 8, 8, 128, 4, torch.bfloat16, "page"),
])
@pytest.mark.parametrize("flash_path", [False, True], ids=["kernel", "flash"])
def test_backend_extend_matches_per_request(P, Hq, H, D, bits, dtype, prefill, flash_path, monkeypatch):
    from sglang_oscar import flash
    from test_backend_gpu import run_case
    # every extend step through one path
    monkeypatch.setattr(flash, "MIN_TOKENS", {d: ((0, 0 if flash_path else 1 << 30),) for d in (64, 128)})
    # chunks of several query blocks and pages, one mid-page start, one request without a packed page
    worst_ext, worst, _ = run_case("cuda", P, Hq, H, D, bits, dtype, [700, 3 * P + 5, 9, 2 * P], prefill=prefill)
    assert worst_ext < 2.5e-2, worst_ext
    assert worst < 2.5e-2, worst


def test_plan_matches_loop_reference():
    # CPU: the device-side plan (torch ops over [B] tensors) against plain loops, on random ragged batches
    rnd = random.Random(0)
    for P in (32, 64, 128):
        for trial in range(20):
            B = rnd.randint(1, 6)
            prefix = [rnd.choice([0, P - 1, P, rnd.randint(0, 5 * P)]) for _ in range(B)]
            ext = [rnd.choice([1, 7, P, P + 1, rnd.randint(1, 4 * P)]) for _ in range(B)]
            rows = rnd.sample(range(1, B + 5), B)
            width = (max(a + e for a, e in zip(prefix, ext)) // P + 2) * P
            req_to_token = torch.randint(0, 1000, (B + 5, width), dtype=torch.int32)
            got = plan_extend(torch.tensor(rows), torch.tensor(prefix), torch.tensor(ext), prefix, ext, P, req_to_token)
            ref = plan_reference(rows, prefix, ext, P, req_to_token)
            assert got.n_raw == ref["n_raw"]
            assert got.dst_new.tolist() == ref["dst_new"]
            assert got.info.tolist() == ref["info"]
            res = [] if got.res is None else list(zip(*[t.tolist() for t in got.res]))
            assert res == ref["res"]
            start, ids = ([], []) if got.store is None else (t.tolist() for t in got.store)
            assert (start, ids) == (ref["store"][0], ref["store"][1])
            src = [None] * ref["n_raw"]   # the copy kernel's sources: new token t, or a residual (row, slot)
            for t, d in enumerate(ref["dst_new"]):
                src[d] = t
            for row, slot, d in ref["res"]:
                src[d] = -1 - (row * P + slot)
            assert got.src.tolist() == src
            assert ([] if got.tail_dst is None else got.tail_dst.tolist()) == [r * P + j for _, r, j in ref["tail"]]
            tail = [] if got.tail is None else list(zip(*[t.tolist() for t in got.tail]))
            assert tail == ref["tail"]

