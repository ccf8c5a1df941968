"""CUDA kernels vs their torch twins on fresh random inputs (needs a CUDA device).

Every output and every pool page the kernels must write is poisoned (NaN / sentinel) first.

Matrix (bounded to a few minutes on one H200):
  * decode, cheap axes in full: page {32,64,128} x (Hq,Hkv) {(32,8),(9,3),(8,8)} x head_dim {64,128}
    x dtype {bf16,fp16} x bits {2,4} = 72 cases. Each case is a ragged batch: batch size cycles over
    {1,3,17} and the contexts cycle over {1,31,32,33,1000,4096}, rotated per case so every length
    meets every page size; the method cycles over oscar/quarot/kivi.
  * decode, long contexts: 8 sampled cases with 33000-token requests (batch 1, 3 and 17, ragged),
    covering each dtype, bits, head_dim, page size and head shape at least once.
  * store: page {32,64,128} x (H) {8,3} x head_dim {64,128} x dtype x bits x method (oscar, kivi, quarot
    on a subset): kernel vs quant.store_pages.
Bounds: decode max|out - ref| <= 2.5e-2 * max|ref| and mean|out - ref| <= 1e-2 * mean|ref|. The
reference dequantizes the same pool in fp32, so the bound measures only the kernel's arithmetic: the
packed path runs on fp16 tensor cores (q rotated and scaled to [-1, 1] in fp16, K and V dequantized
to fp16, P in fp16, fp32 accumulation), so a logit carries ~2^-11 relative error of |q||k|; with the
test's deliberately wide logits (|logit| up to ~10) that is ~1e-2 in max-relative output terms, as
with any 16-bit attention kernel. Measured worst cases: see bench/results/gpu_tests_h200.txt.
lse (base 2, returned for the chunk-prefill merge): within 0.1 of the reference's. It inherits the
logits' error, up to ~2^-10 of |q||k| x scale x log2(e), which the test's outlier keys (x6 channels,
unrotated for kivi) push to ~100: ~0.1 (measured worst 0.05).
Store: codes equal except +-1 at rounding ties (fraction <= 1e-3), scales/zeros within 1 fp16 ulp,
norms to 1e-5 relative.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from sglang_oscar import layout, quant
from sglang_oscar.config import OscarConfig
from sglang_oscar.layout import FIELDS
from sglang_oscar.wrapper import DecodeWrapper, PageLookup, decode_reference, split_schedule, store_pages

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
TOL = {torch.bfloat16: 2.5e-2, torch.float16: 2.5e-2}   # max |err| / max |ref|
MEAN_TOL = 1e-2                                           # mean |err| / mean |ref|
LSE_TOL = 1e-1                                            # |lse - ref| (base 2), see below
CONTEXTS = (1, 31, 32, 33, 1000, 4096)
BATCHES = (1, 3, 17)
METHODS = ("oscar", "quarot", "kivi")


def make_kv(n_tok, H, D, dtype, gen):
    """Keys with per-channel offsets and a few outlier channels (what rotation and norms are for)."""
    k = torch.randn(n_tok, H, D, generator=gen, device=DEV)
    k = k + torch.randn(1, H, D, generator=gen, device=DEV) * 2
    k[:, :, :: max(1, D // 8)] *= 6
    v = torch.randn(n_tok, H, D, generator=gen, device=DEV)
    return k.to(dtype), v.to(dtype)


def empty_pool(num_pages, P, H, D, bits):
    pool = {}
    for f, (shape, dt) in layout.page_shapes(P, H, D, bits).items():
        t = torch.empty((num_pages, *shape), dtype=dt, device=DEV)
        if dt.is_floating_point:
            t.fill_(float("nan"))
        else:
            t.fill_(0x5A5A5A5A)
        pool[f] = t
    return pool


def build_case(B, contexts, P, Hq, H, D, dtype, cfg, seed, prefix_only=False):
    """prefix_only: every context is whole pages and res_len is 0 (a chunk prefill's prefix part)."""
    gen = torch.Generator(device=DEV).manual_seed(seed)
    n_pages = [L // P if prefix_only else (L - 1) // P for L in contexts]
    res_len = [L - n * P for L, n in zip(contexts, n_pages)]
    total = sum(n_pages)
    num_pool = total + 5                                        # spare pages stay poisoned
    pool = empty_pool(num_pool, P, H, D, cfg.bits)
    perm = torch.randperm(num_pool, generator=gen, device=DEV)[:total]
    max_pages = max(max(n_pages), 1) + 3
    page_table = torch.full((B, max_pages), -1, dtype=torch.int32, device=DEV)
    R = B + 2
    rows = torch.randperm(R, generator=gen, device=DEV)[:B]
    res_k = torch.full((R, P, H, D), float("nan"), dtype=dtype, device=DEV)
    res_v = torch.full((R, P, H, D), float("nan"), dtype=dtype, device=DEV)
    off = 0
    for b, (n, rl) in enumerate(zip(n_pages, res_len)):
        k, v = make_kv(n * P + rl, H, D, dtype, gen)
        if n:
            ids = perm[off:off + n]
            page_table[b, :n] = ids.to(torch.int32)
            packed = quant.store_pages(k[: n * P].view(n, P, H, D), v[: n * P].view(n, P, H, D), cfg)
            for f in FIELDS:
                pool[f][ids.long()] = packed[f]
            off += n
        res_k[rows[b], :rl] = k[n * P:]
        res_v[rows[b], :rl] = v[n * P:]
    q = (torch.randn(B, Hq, D, generator=gen, device=DEV) * 2).to(dtype)
    return q, pool, res_k, res_v, page_table, torch.tensor(n_pages, dtype=torch.int32), rows.to(torch.int64), \
        torch.tensor(res_len, dtype=torch.int32, device=DEV)


def as_req_to_token(pt, P, gen):
    """The same pages as SGLang lays them out: token slots (page * P + offset) in the rows of a
    req_to_token table, query b in row rows[b] (shuffled, row 0 unused), read in place by the kernel."""
    B, W = pt.shape
    rows = torch.randperm(B + 2, generator=gen, device=DEV)[:B] + 1
    r2t = torch.full((B + 3, W * P + 7), -1, dtype=torch.int32, device=DEV)
    slots = (pt.clamp(min=0)[:, :, None] * P + torch.arange(P, device=DEV, dtype=torch.int32)).view(B, W * P)
    r2t[rows, : W * P] = slots
    return PageLookup(r2t, rows.to(torch.int64), P, P.bit_length() - 1)


def check_decode(B, contexts, P, Hq, H, D, dtype, bits, method, seed, prefix_only=False, lookup=False, splits=None):
    """lookup: page ids read from a req_to_token-style table (else a plain page table); splits: forced
    split count (else the wrapper's for this batch size)."""
    cfg = OscarConfig(method=method, bits=bits, page_size=P)
    q, pool, res_k, res_v, pt, npg, rows, rlen = build_case(B, contexts, P, Hq, H, D, dtype, cfg, seed,
                                                            prefix_only)
    sm_scale = 1.0 / math.sqrt(D)
    pages = as_req_to_token(pt, P, torch.Generator(device=DEV).manual_seed(seed)) if lookup else pt
    w = DecodeWrapper(cfg, Hq, H, D, dtype, DEV)
    w.plan(pages, npg.to(DEV), rows, rlen, splits=splits)
    w.part_o.fill_(float("nan"))
    w.part_lse.fill_(float("nan"))
    out = torch.full_like(q, float("nan"))
    _, lse = w.run(q, pool, res_k, res_v, sm_scale, out=out, return_lse=True)
    ref, ref_lse = decode_reference(q, pool, res_k, res_v, sm_scale, pt, npg, rows, rlen.cpu(), cfg,
                                    return_lse=True)
    ref = ref.float()
    # lse (base 2) of the same logits: the kernel's logits carry fp16 tensor-core rounding (see above)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), "lse -inf exactly where nothing is visible"
    lse_err = float((lse - ref_lse)[~empty].abs().max()) if (~empty).any() else 0.0
    assert lse_err <= LSE_TOL, f"lse err {lse_err:.3e}"
    got = out.float()
    assert torch.isfinite(got).all(), "kernel left unwritten / non-finite outputs"
    err = (got - ref).abs()
    scale = ref.abs().amax().clamp_min(1e-6)
    max_rel = float(err.max() / scale)
    mean_rel = float(err.mean() / ref.abs().mean().clamp_min(1e-6))
    used = split_schedule(npg, P, w.planned_splits)[2]
    tag = f"B={B} ctx={contexts[:4]}{'...' if len(contexts) > 4 else ''} P={P} Hq/H={Hq}/{H} D={D} " \
          f"{str(dtype)[6:]} {method}-{bits} {'req_to_token' if lookup else 'table'} " \
          f"splits<={w.planned_splits} (used {int(used.max())})"
    print(f"decode {tag}: max_rel={max_rel:.2e} mean_rel={mean_rel:.2e} lse_err={lse_err:.2e}")
    assert max_rel <= TOL[dtype], f"{tag}: max_rel {max_rel:.3e} > {TOL[dtype]}"
    assert mean_rel <= MEAN_TOL, f"{tag}: mean_rel {mean_rel:.3e}"


SMALL = list(itertools.product((32, 64, 128), ((32, 8), (9, 3), (8, 8)), (64, 128),
                               (torch.bfloat16, torch.float16), (2, 4)))


@pytest.mark.parametrize("i", range(len(SMALL)))
def test_decode_matrix(i):
    P, (Hq, H), D, dtype, bits = SMALL[i]
    B = BATCHES[i % 3]
    contexts = [CONTEXTS[(i + j) % len(CONTEXTS)] for j in range(B)]
    check_decode(B, contexts, P, Hq, H, D, dtype, bits, METHODS[i % 3], seed=1000 + i, lookup=bool(i % 2))


LONG = [  # (B, contexts, P, Hq, H, D, dtype, bits, method)
    (1, [33000], 64, 32, 8, 128, torch.bfloat16, 2, "oscar"),
    (1, [33000], 32, 32, 8, 128, torch.float16, 4, "oscar"),
    (3, [33000, 1, 4096], 128, 9, 3, 64, torch.bfloat16, 2, "oscar"),
    (3, [31, 33000, 1000], 64, 8, 8, 64, torch.float16, 2, "kivi"),
    (3, [33000, 33000, 32], 128, 32, 8, 128, torch.float16, 4, "quarot"),
    (17, [33000] + [33, 1000, 4096] * 5 + [1], 64, 32, 8, 128, torch.bfloat16, 2, "oscar"),
    (17, [4096, 33000] * 8 + [31], 32, 9, 3, 64, torch.float16, 4, "oscar"),
    (1, [33000], 128, 8, 8, 128, torch.bfloat16, 4, "kivi"),
]


@pytest.mark.parametrize("case", LONG, ids=[f"long{i}" for i in range(len(LONG))])
def test_decode_long(case):
    B, contexts, P, Hq, H, D, dtype, bits, method = case
    check_decode(B, contexts, P, Hq, H, D, dtype, bits, method, seed=7, lookup=B != 3)


@pytest.mark.parametrize("splits", [1, 2, 5])
def test_decode_forced_splits(splits):
    """Ragged lengths under a fixed split count (as a CUDA graph of a larger batch runs them): every
    query uses min(splits, its stage count / 2) splits, its residual in the last one."""
    contexts = [33000, 1, 64, 65, 300, 4096, 129, 2000]
    check_decode(len(contexts), contexts, 64, 32, 8, 128, torch.bfloat16, 2, "oscar", seed=20 + splits,
                 lookup=True, splits=splits)


PREFIX_ONLY = [  # (B, contexts, P, Hq, H, D, dtype, bits): res_len 0, some split (long), one empty
    (3, [64, 0, 4096], 64, 32, 8, 128, torch.bfloat16, 2),
    (3, [33024, 32, 960], 32, 9, 3, 64, torch.float16, 4),
    (1, [33024], 128, 8, 8, 128, torch.bfloat16, 2),
]


@pytest.mark.parametrize("case", PREFIX_ONLY, ids=[f"prefix{i}" for i in range(len(PREFIX_ONLY))])
def test_decode_prefix_only_with_lse(case):
    B, contexts, P, Hq, H, D, dtype, bits = case
    check_decode(B, contexts, P, Hq, H, D, dtype, bits, "oscar", seed=11, prefix_only=True, lookup=B == 3)


def test_decode_plan_reuse_across_layers():
    """One plan, several layers (pools): the launch state must not leak between runs."""
    cfg = OscarConfig(bits=2, page_size=64)
    q, pool, res_k, res_v, pt, npg, rows, rlen = build_case(3, [5000, 70, 1], 64, 32, 8, 128, torch.bfloat16, cfg, 3)
    w = DecodeWrapper(cfg, 32, 8, 128, torch.bfloat16, DEV)
    w.plan(pt, npg.to(DEV), rows, rlen)
    a = w.run(q, pool, res_k, res_v)
    b = w.run(q, pool, res_k, res_v)
    assert torch.equal(a, b)


STORE = [(P, H, D, dt, bits, m)
         for P, H, D, dt, bits in itertools.product((32, 64, 128), (8, 3), (64, 128),
                                                   (torch.bfloat16, torch.float16), (2, 4))
         for m in (("oscar", "kivi", "quarot") if (P == 64 and H == 8) else ("oscar",))]


@pytest.mark.parametrize("case", STORE, ids=[f"P{c[0]}-H{c[1]}-D{c[2]}-{str(c[3])[6:]}-b{c[4]}-{c[5]}" for c in STORE])
def test_store_kernel(case):
    P, H, D, dtype, bits, method = case
    cfg = OscarConfig(method=method, bits=bits, page_size=P)
    gen = torch.Generator(device=DEV).manual_seed(P * 7 + H * 3 + D + bits)
    N = 13
    k, v = make_kv(N * P, H, D, dtype, gen)
    k, v = k.view(N, P, H, D), v.view(N, P, H, D)
    # constant groups: a whole K group of one channel, a whole V group of one token
    k[1, :32, 0, 5] = 0.75
    v[2, 3, 1 % H, 32:64] = -1.5
    num_pool = N + 4
    pool = empty_pool(num_pool, P, H, D, bits)
    ids = torch.randperm(num_pool, generator=gen, device=DEV)[:N]
    store_pages(k, v, ids, pool, cfg)
    ref = quant.store_pages(k, v, cfg)
    untouched = sorted(set(range(num_pool)) - set(ids.tolist()))
    assert torch.isnan(pool["k_scale"][untouched]).all(), "store wrote outside its pages"
    got = {f: pool[f][ids] for f in FIELDS}
    for f in ("k_codes", "v_codes"):
        a = layout.unpack_codes(got[f], bits).int()
        b = layout.unpack_codes(ref[f], bits).int()
        diff = (a - b).abs()
        frac = float((diff > 0).float().mean())
        print(f"store {case[:3]} {str(dtype)[6:]} {method}-{bits} {f}: mismatch fraction {frac:.2e}")
        assert int(diff.max()) <= 1, f"{f}: code off by more than 1"
        assert frac <= 1e-3, f"{f}: {frac:.2e} of codes differ"
    for f in ("k_scale", "k_zero", "v_scale", "v_zero"):
        a, b = got[f].float(), ref[f].float()
        assert torch.isfinite(a).all(), f"{f} not fully written"
        ulp = b.abs().clamp_min(6.1e-5) * 2.0 ** -10
        assert bool(((a - b).abs() <= ulp * 1.01).all()), f"{f}: off by more than one fp16 ulp"
    torch.testing.assert_close(got["k_norm"], ref["k_norm"], rtol=1e-5, atol=0)


@pytest.mark.parametrize("from_rows", [False, True])
def test_store_kernel_with_the_norm_of_all_heads(from_rows):
    """Tensor parallelism: a rank's store gets each token's squared key norm over all KV heads
    (sq, row for row with k). Its pages must equal the whole-token store's pages of its heads: the
    norm of all heads, and codes/scales as the kernel packs the full page given the same norms."""
    P, H, D, dtype = 64, 8, 128, torch.bfloat16
    cfg = OscarConfig(method="oscar", bits=2, page_size=P)
    gen = torch.Generator(device=DEV).manual_seed(5)
    R = 6
    k, v = make_kv(R * P, H, D, dtype, gen)
    k, v = k.view(R, P, H, D), v.view(R, P, H, D)
    rows = torch.tensor([3, 0, 5], device=DEV) if from_rows else None
    ids = torch.tensor([2, -1, 4], device=DEV) if from_rows else torch.arange(R, device=DEV)
    keep = ids >= 0
    sq = quant.norm_sq(k)                        # [R, P], what the ranks' all-reduce sums to
    own, full = empty_pool(8, P, H, D, 2), empty_pool(8, P, H, D, 2)
    store_pages(k, v, ids, own, cfg, rows=rows)  # the norm summed in the kernel
    store_pages(k, v, ids, full, cfg, rows=rows, sq=sq)
    torch.testing.assert_close(full["k_norm"][ids[keep]], own["k_norm"][ids[keep]], rtol=1e-6, atol=0)
    for f in ("k_codes", "v_codes"):   # the same up to a tie the last bit of the norm may move
        diff = layout.unpack_codes(full[f][ids[keep]], 2).int() - layout.unpack_codes(own[f][ids[keep]], 2).int()
        assert int(diff.abs().max()) <= 1 and float((diff != 0).float().mean()) <= 1e-4, f
    for heads in (slice(0, 4), slice(4, 8)):
        part = empty_pool(8, P, 4, D, 2)
        store_pages(k[:, :, heads].contiguous(), v[:, :, heads].contiguous(), ids, part, cfg, rows=rows, sq=sq)
        got = {f: part[f][ids[keep]] for f in FIELDS}
        want = {f: full[f][ids[keep]] for f in FIELDS}
        torch.testing.assert_close(got["k_norm"], want["k_norm"], rtol=1e-6, atol=0)
        for f in FIELDS[:-1]:
            assert torch.equal(got[f], want[f][:, heads]), f
        src = rows[keep] if from_rows else torch.arange(R, device=DEV)
        ref = quant.store_pages(k[src][:, :, heads], v[src][:, :, heads], cfg, sq[src])
        torch.testing.assert_close(got["k_norm"], ref["k_norm"], rtol=1e-5, atol=0)


def test_store_kernel_from_rows_skips_negative_ids():
    """The decode-step store: pages read from rows of a residual-shaped buffer, entries with page id -1
    skipped on the device (lanes whose token completes no page)."""
    P, H, D, dtype = 64, 8, 128, torch.bfloat16
    cfg = OscarConfig(method="oscar", bits=2, page_size=P)
    gen = torch.Generator(device=DEV).manual_seed(3)
    R = 9
    k, v = make_kv(R * P, H, D, dtype, gen)
    k, v = k.view(R, P, H, D), v.view(R, P, H, D)
    rows = torch.tensor([4, 0, 7, 2, 5], device=DEV)
    ids = torch.tensor([6, -1, 1, -1, 3], device=DEV)
    pool = empty_pool(8, P, H, D, 2)
    store_pages(k, v, ids, pool, cfg, rows=rows)
    keep = ids >= 0
    ref = quant.store_pages(k[rows[keep]], v[rows[keep]], cfg)
    for f in FIELDS:
        got = pool[f][ids[keep]]
        if f in ("k_codes", "v_codes"):
            diff = (layout.unpack_codes(got, 2).int() - layout.unpack_codes(ref[f], 2).int()).abs()
            assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 1e-3, f
        else:
            torch.testing.assert_close(got.float(), ref[f].float(), rtol=2 ** -10, atol=1e-6)
    untouched = [0, 2, 4, 5, 7]
    assert torch.isnan(pool["k_scale"][untouched]).all() and torch.isnan(pool["k_norm"][untouched]).all()
