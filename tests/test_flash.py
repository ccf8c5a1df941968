"""The flash path for large prefills (flash.py) against extend.extend_reference, and its device pieces
against their torch twins.

CPU: the whole path with the twins (dequant_reference, varlen_reference, merge_reference) equals the
extend spec over page {32,64,128} x both prefill modes x methods x ragged batches whose prefixes and
chunks cross page and 128-token block edges; the merge twin against attention over the union of keys.
CUDA (gpu): the dequant kernel bit-exact against its twin; the merge kernel against its twin, empty
parts included; torch's FlashAttention varlen (seqused_k, overlapping and empty sequences, causal)
against varlen_reference, which pins the lse layout [Hq, T] the merge reads; run_extend forced onto the
flash path against extend_reference over the extend kernel's matrix and long cases; the backend with
the flash path on against its per-request path (test_extend_gpu, both paths). Bounds are test_extend_gpu's.
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from sglang_oscar import flash
from sglang_oscar.extend import extend_reference, run_extend
from test_extend_gpu import LONG, LSE_TOL, MATRIX, MEAN_TOL, METHODS, TOL, needs_cuda, step_case


def errors(out, lse, ref, ref_lse):
    err = (out.float() - ref.float()).abs()
    return (err.max().item() / ref.float().abs().max().item(), err.mean().item() / ref.float().abs().mean().item(),
            (lse - ref_lse).abs().max().item())


def check(reqs, P, Hq, H, D, dtype, bits, method, prefill, seed, dev):
    q, pool, raw_k, raw_v, plan, cfg = step_case(reqs, P, Hq, H, D, dtype, bits, method, prefill, seed, dev=dev)
    scale = D ** -0.5
    if dev == "cpu":
        plan.flash = flash.plan_flash(plan, cfg)
        out, lse = flash.run_flash(q, pool, raw_k, raw_v, plan, cfg, scale)
    else:
        plan.use_flash = True
        out = torch.full_like(q, float("nan"))
        lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
        run_extend(q, pool, raw_k, raw_v, plan, cfg, scale, return_lse=True, out=out, lse=lse)
        assert plan.flash is not None   # it really took the flash path
    ref, ref_lse = extend_reference(q, pool, raw_k, raw_v, plan, cfg, scale, return_lse=True)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    rel, mean, lse_err = errors(out, lse, ref, ref_lse)
    assert rel <= TOL and mean <= MEAN_TOL and lse_err <= LSE_TOL, (reqs, rel, mean, lse_err)
    return rel, mean, lse_err


# ragged batches whose prefixes and chunks start and end on and off page and 128-token block edges
CPU_REQS = [
    [(0, 300)],
    [(64, 65), (0, 7)],
    [(130, 1), (4095, 200), (0, 129)],
    [(256, 256), (31, 97)],
    [(1000, 40), (127, 2), (0, 1)],
]
CPU_CASES = list(itertools.product((32, 64, 128), ("page", "chunk"), range(len(CPU_REQS))))


@pytest.mark.parametrize("i", range(len(CPU_CASES)))
def test_flash_twins_match_extend_spec(i):
    P, prefill, r = CPU_CASES[i]
    Hq, H, D = ((8, 2, 64), (4, 4, 32), (6, 3, 64))[i % 3]
    dtype = torch.float16 if i % 5 == 4 else torch.bfloat16
    check(CPU_REQS[r], P, Hq, H, D, dtype, (2, 4)[i % 2], METHODS[i % 3], prefill, seed=i, dev="cpu")


def test_merge_reference_is_attention_over_the_union():
    # three parts over disjoint key sets, one of them empty for some rows, merge == one softmax over all keys
    gen = torch.Generator().manual_seed(0)
    T, Hq, H, D = 9, 4, 2, 16
    q = torch.randn(T, Hq, D, generator=gen, dtype=torch.float64)
    ks = [torch.randn(n, H, D, generator=gen, dtype=torch.float64) for n in (5, 3, 4)]
    vs = [torch.randn(n, H, D, generator=gen, dtype=torch.float64) for n in (5, 3, 4)]
    outs, lses = [], []
    cu_q = torch.tensor([0, 4, T])
    for j, (k, v) in enumerate(zip(ks, vs)):
        used = torch.tensor([len(k), 0 if j == 1 else len(k)])   # part 1 is empty for rows 4..8
        o, l = flash.varlen_reference(q, k, v, cu_q, torch.tensor([0, 0, len(k)]), used, False, 0.3)
        outs.append(o)
        lses.append(l if j != 1 else torch.where(torch.isinf(l), float("inf"), l))   # +inf also means empty
    out, lse = flash.merge_reference(outs, lses)
    for rows, parts in ((range(0, 4), (0, 1, 2)), (range(4, T), (0, 2))):
        rows = list(rows)
        k = torch.cat([ks[j] for j in parts]).repeat_interleave(Hq // H, 1)
        v = torch.cat([vs[j] for j in parts]).repeat_interleave(Hq // H, 1)
        s = torch.einsum("thd,jhd->htj", q[rows], k) * 0.3
        want = torch.einsum("htj,jhd->thd", torch.softmax(s, -1), v)
        assert torch.allclose(out[rows].double(), want, atol=1e-5)
        assert torch.allclose(lse[rows].double(), torch.logsumexp(s, -1).t() / math.log(2), atol=1e-5)


def test_flash_serves_only_large_steps(monkeypatch):
    from sglang_oscar.extend import _flash_serves

    def serves(pre, n):
        plan, cfg = step_case([(pre, n)], 64, 4, 2, 32, torch.bfloat16, 2, "oscar", "page", 0, dev="cpu")[4:]
        use = _flash_serves(plan, cfg, 2, 32)
        assert use == (plan.flash is not None)
        return use
    # D=32 has no table of its own: d=128's; each bound's threshold, and below a bound the lower one's
    table = flash.MIN_TOKENS[128]
    for i, (bound, n) in enumerate(table):
        assert not serves(bound, n - 1) and serves(bound, n)
        if i:
            assert not serves(bound - 1, n) and serves(bound - 1, table[i - 1][1])
    assert flash.min_tokens(24576, 64) == 768 and flash.min_tokens(24575, 64) == 2048
    assert flash.min_tokens(0, 64) == 4096 and flash.min_tokens(1 << 20, 128) == 256
    monkeypatch.setattr(flash, "SCRATCH_BYTES", 1024)   # a scratch over the bound keeps the extend kernel
    assert not serves(table[-1][0], table[-1][1])


# ---- CUDA ---------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("P,H,D,bits,dtype,method", [
    (32, 8, 128, 2, torch.bfloat16, "oscar"), (64, 3, 64, 4, torch.float16, "quarot"),
    (128, 8, 64, 2, torch.float16, "kivi"), (64, 8, 128, 4, torch.bfloat16, "oscar")])
def test_dequant_kernel_bit_exact(P, H, D, bits, dtype, method):
    from sglang_oscar import ops
    from sglang_oscar.layout import FIELDS
    q, pool, raw_k, raw_v, plan, cfg = step_case([(9 * P + 3, 2 * P)], P, H, H, D, dtype, bits, method, "page", 1)
    ids = torch.tensor([5, 0, 3, 3, 10, 1], device="cuda") % pool["k_norm"].shape[0]
    dk = torch.full((len(ids) * P, H, D), float("nan"), dtype=dtype, device="cuda")
    dv = torch.full_like(dk, float("nan"))
    ops.load().dequant(*[pool[f] for f in FIELDS], ids, dk, dv, bits)
    rk, rv = flash.dequant_reference(pool, ids, bits, dtype)
    assert torch.equal(dk, rk) and torch.equal(dv, rv)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("n,D,dtype", [(1, 128, torch.bfloat16), (2, 64, torch.float16), (3, 128, torch.float16)])
def test_merge_kernel_matches_twin(n, D, dtype):
    from sglang_oscar import ops
    gen = torch.Generator(device="cuda").manual_seed(n)
    T, Hq = 37, 12
    outs = [torch.randn(T, Hq, D, generator=gen, device="cuda").to(dtype) for _ in range(n)]
    lses = [torch.randn(Hq, T, generator=gen, device="cuda") * 4 for _ in range(n)]
    lses[0][:, 3] = float("inf")         # FlashAttention's empty row
    lses[-1][:, 5] = float("-inf")
    if n > 1:
        lses[1][2, :] = float("inf")
    out = torch.full_like(outs[0], float("nan"))
    lse = torch.full((T, Hq), float("nan"), device="cuda")
    ops.load().merge(outs, lses, out, lse)
    ref, ref_lse = flash.merge_reference(outs, lses)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin] - ref_lse[fin]).abs().max().item() < 1e-5
    assert (out.float() - ref.float())[fin].abs().max().item() <= 2 * 2 ** -7 * ref.float().abs().max().item()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("causal", [False, True])
def test_flash_varlen_matches_reference(causal):
    gen = torch.Generator(device="cuda").manual_seed(int(causal))
    Hq, H, D, dtype = 8, 2, 128, torch.bfloat16
    k = torch.randn(300, H, D, generator=gen, device="cuda").to(dtype)
    v = torch.randn(300, H, D, generator=gen, device="cuda").to(dtype)
    lens_q = [5, 0, 130, 64, 1]
    starts = [0, 10, 0, 200, 250]     # sequences overlap in the key buffer
    used = [40, 7, 256, 0, 50]        # one empty: it must come back with no contribution
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), dtype=torch.int32, device="cuda")
    q = torch.randn(int(cu_q[-1]), Hq, D, generator=gen, device="cuda").to(dtype)
    part = flash.FlashPart(cu_q=cu_q, cu_k=torch.tensor(starts + [300], dtype=torch.int32, device="cuda"),
                           used=torch.tensor(used, dtype=torch.int32, device="cuda"), max_q=max(lens_q),
                           max_k=max(used), causal=causal, dequantized=False)
    o, lse = flash._flash(q, k, v, part, 0.1)
    ro, rl = flash.varlen_reference(q, k, v, part.cu_q, part.cu_k, part.used, causal, 0.1)
    assert lse.shape == rl.shape == (Hq, q.shape[0])
    seen = torch.isfinite(rl)
    assert ((lse == float("inf")) | (lse == float("-inf")))[~seen].all()
    assert (lse[seen] - rl[seen]).abs().max().item() < 1e-3
    rows = seen.all(0)
    assert (o[rows].float() - ro[rows].float()).abs().max().item() < 2e-2


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("i", range(0, len(MATRIX), 3))
def test_flash_path_matrix(i):
    P, (Hq, H), D, dtype, bits, prefill = MATRIX[i]
    chunks, prefixes = (1, 7, 64, 65, 1000, 300), (0, 64, 4095, 129)
    reqs = [(prefixes[(i + j) % 4], chunks[(i * 2 + j) % 6]) for j in range(1 + i % 3)]
    check(reqs, P, Hq, H, D, dtype, bits, METHODS[i % 3], prefill, seed=i, dev="cuda")


SHORT = [  # few queries over long prefixes
    ([(24576, 32)], 64, (32, 8), 128, torch.bfloat16, 2, "page"),
    ([(24576, 32)], 64, (32, 8), 128, torch.bfloat16, 2, "chunk"),
    ([(24576 + 5, 100), (0, 7), (8192, 1)], 64, (9, 3), 64, torch.float16, 4, "chunk"),
    ([(16384 + 40, 300), (4095, 20)], 128, (32, 8), 128, torch.bfloat16, 2, "page"),
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", range(len(LONG) + len(SHORT)))
def test_flash_path_long(case):
    reqs, P, (Hq, H), D, dtype, bits, prefill = (LONG + SHORT)[case]
    rel, mean, lse_err = check(reqs, P, Hq, H, D, dtype, bits, "oscar", prefill, seed=200 + case, dev="cuda")
    print(f"flash long {reqs} P={P} {Hq}/{H} d={D} {prefill}: rel {rel:.2e} mean {mean:.2e} lse {lse_err:.2e}")
