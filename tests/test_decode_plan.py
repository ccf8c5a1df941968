"""Host-free decode planning on the CPU: the split schedule's twin, the decode batch indices, and the
GPU-architecture gate of the CUDA kernels (capability monkeypatched; no GPU needed)."""
from __future__ import annotations

import logging
import random

import pytest
import torch

from sglang_oscar import backend, ops
from sglang_oscar.backend import DecodeBatch, decode_kernels_usable
from sglang_oscar.config import OscarConfig
from sglang_oscar.wrapper import MIN_SPLIT_STAGES, STAGE_TOKENS, split_schedule


def reference_splits(n: int, P: int, splits: int) -> list[tuple[int, int]]:
    """Page ranges of one query, spelled out: as few as one wave allows, each at least
    MIN_SPLIT_STAGES stages (bar the last), whole stages, evenly sized."""
    pps = STAGE_TOKENS // P
    stages = -(-n // pps)
    if stages == 0:
        return [(0, 0)]
    want = min(splits, -(-stages // MIN_SPLIT_STAGES))
    size = -(-stages // want) * pps
    out, first = [], 0
    while first < n:
        out.append((first, min(n, first + size)))
        first += size
    return out


@pytest.mark.parametrize("P", [32, 64, 128])
def test_split_schedule_matches_reference(P):
    rnd = random.Random(P)
    for splits in (1, 2, 3, 8, 66):
        lens = [0, 1, 2, 3, 4, 5, 8, 9] + [rnd.randrange(0, 3000) for _ in range(40)]
        first, end, count = split_schedule(torch.tensor(lens), P, splits)
        assert first.shape == (len(lens), splits)
        for b, n in enumerate(lens):
            ref = reference_splits(n, P, splits)
            c = int(count[b])
            assert c == len(ref) <= splits, (n, splits)
            got = [(int(first[b, i]), int(end[b, i])) for i in range(c)]
            assert got == ref, (n, splits)
            # the ranges tile [0, n) in stage-aligned pieces; unused splits are empty
            assert got[0][0] == 0 and got[-1][1] == n
            assert all(a == e for (_, e), (a, _) in zip(got, got[1:]))
            assert all(a % (STAGE_TOKENS // P) == 0 for a, _ in got)
            assert all(int(first[b, i]) == int(end[b, i]) for i in range(c, splits))


def test_decode_batch_fill_matches_reference():
    P = 64
    gen = torch.Generator().manual_seed(0)
    R, width = 9, 40 * P
    # random distinct pages per row; slot = page * P + offset (SGLang allocates pages whole)
    pages = torch.randperm(R * 40, generator=gen).view(R, 40) + 1
    req_to_token = (pages[:, :, None] * P + torch.arange(P)).view(R, width).to(torch.int32)
    rows = [3, 1, 7, 0, 0]                    # two padded lanes (row 0, seq_len 1) at the end
    seq = [P, 1, 5 * P + 7, 1, 1]
    bs = len(rows)
    db = DecodeBatch.empty(bs, "cpu")
    db.fill(torch.tensor(rows), torch.tensor(seq), req_to_token, P)
    for b, (r, s) in enumerate(zip(rows, seq)):
        n = (s - 1) // P
        assert int(db.rows[b]) == r
        assert int(db.num_pages[b]) == n
        assert int(db.res_len[b]) == s - n * P
        assert int(db.slot[b]) == (s - 1) % P
        want = int(pages[r, n]) if s % P == 0 else -1
        assert int(db.store_page[b]) == want
    # a view shares storage: values filled later are what a captured graph reads
    v = db.view(2, 3)
    db.num_pages[1] = 99
    assert int(v.num_pages[1]) == 99 and v.splits == 3


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CUDA device of a chosen compute capability, as far as the gate can tell."""
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])
    monkeypatch.setattr(backend, "_fallback_warned", False)
    monkeypatch.delenv("SGLANG_OSCAR_DECODE", raising=False)
    return cap


def test_kernels_gated_on_compute_capability(fake_gpu, caplog, monkeypatch):
    cfg = OscarConfig(method="oscar", bits=2, page_size=64)
    monkeypatch.delenv("SGLANG_OSCAR_ARCH", raising=False)
    for cap, arch in (((8, 0), "80"), ((8, 6), "86"), ((8, 9), "89"), ((9, 0), "90a"), ((10, 0), "100")):
        fake_gpu["value"] = cap
        assert ops.available() and ops.unsupported_reason() is None
        assert decode_kernels_usable("cuda", cfg, 128)
        assert ops.target_arch() == arch and ops.cuda_flags()[-1] == f"arch=compute_{arch},code=sm_{arch}"
    for cap in ((7, 5), (8, 7), (12, 0)):
        fake_gpu["value"] = cap
        assert not ops.available()
        assert f"{cap[0]}.{cap[1]}" in ops.unsupported_reason()
        with pytest.raises(RuntimeError, match="cannot run on this GPU"):
            ops.load()
    fake_gpu["value"] = (7, 5)
    with caplog.at_level(logging.WARNING, logger=backend.logger.name):
        assert not decode_kernels_usable("cuda", cfg, 128)
        assert not decode_kernels_usable("cuda", cfg, 128)   # a second backend (another layer set)
    warnings = [r for r in caplog.records if "torch path" in r.getMessage()]
    assert len(warnings) == 1 and "compute capability 7.5" in warnings[0].getMessage()


def test_build_target_override(fake_gpu, monkeypatch):
    fake_gpu["value"] = (9, 0)
    monkeypatch.setenv("SGLANG_OSCAR_ARCH", "sm_80")   # PTX only: a Hopper runs it by JIT
    assert ops.target_arch() == "80" and ops.cuda_flags()[-1] == "arch=compute_80,code=compute_80"
    monkeypatch.setenv("SGLANG_OSCAR_ARCH", "90a")
    assert ops.cuda_flags()[-1] == "arch=compute_90a,code=compute_90a"
    monkeypatch.setenv("SGLANG_OSCAR_ARCH", "ampere")
    with pytest.raises(ValueError, match="SGLANG_OSCAR_ARCH"):
        ops.target_arch()
    monkeypatch.delenv("SGLANG_OSCAR_ARCH")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert ops.target_arch() == "90a"     # no GPU (a CPU build): the Hopper build


def test_kernels_gated_on_shape_and_override(fake_gpu, monkeypatch, caplog):
    fake_gpu["value"] = (9, 0)
    with caplog.at_level(logging.WARNING, logger=backend.logger.name):
        assert not decode_kernels_usable("cuda", OscarConfig(page_size=256), 128)
        assert not decode_kernels_usable("cuda", OscarConfig(page_size=64), 256)
    assert sum("torch path" in r.getMessage() for r in caplog.records) == 1
    assert "page size 256" in caplog.records[0].getMessage()
    assert not decode_kernels_usable("cuda", OscarConfig(method="bf16"), 128)
    assert not decode_kernels_usable("cpu", OscarConfig(), 128)
    monkeypatch.setenv("SGLANG_OSCAR_DECODE", "torch")
    assert not decode_kernels_usable("cuda", OscarConfig(), 128)
    assert ops.torch_path_reason(OscarConfig()) == "SGLANG_OSCAR_DECODE=torch"


def test_extend_key_splits_take_the_shortest_makespan():
    """The extend plan's key splits: none once the query blocks fill a wave (two 64-row CTAs or one
    128-row CTA per SM); otherwise the split count whose CTAs finish first, counted in whole waves of
    tiles per split plus a split's fixed cost, over runs of at least SPLIT_TILES 64-key tiles of the
    longest request, capped by kMaxExtendSplits; of equally fast counts, the fewest."""
    import math
    from sglang_oscar.extend import MAX_SPLITS, SPLIT_COST, SPLIT_TILES, key_splits
    for count, H, rows, sms, longest in [(1, 8, 64, 132, 24592), (1, 8, 64, 132, 300), (4, 8, 128, 132, 24704),
                                         (40, 8, 64, 132, 8192), (33, 8, 64, 132, 32768), (17, 8, 128, 132, 1 << 17),
                                         (2, 3, 64, 108, 4160), (1, 1, 64, 8, 70000), (4, 8, 64, 132, 24640),
                                         (8, 8, 64, 132, 24704), (8, 3, 64, 132, 2176), (3, 8, 64, 132, 4096)]:
        s = key_splits(count, H, rows, sms, longest)
        wave = sms * (2 if rows == 64 else 1)
        assert 1 <= s <= MAX_SPLITS
        if count * H >= wave:
            assert s == 1
            continue
        tiles = math.ceil(longest / 64)
        assert s == 1 or tiles // s >= SPLIT_TILES                # every split streams enough tiles

        def makespan(n):
            return math.ceil(count * H * n / wave) * (math.ceil(tiles / n) + SPLIT_COST)
        allowed = [n for n in range(1, MAX_SPLITS + 1) if n == 1 or tiles // n >= SPLIT_TILES]
        assert makespan(s) == min(makespan(n) for n in allowed)
        assert all(makespan(n) > makespan(s) for n in allowed if n < s)   # the fewest of the fastest
    # chat turns over a 24k prefix, Llama-8B heads (8 KV heads) on 132 SMs: one full wave, not 1.2
    assert key_splits(1, 8, 64, 132, 24592) == 30      # 16 new tokens: 13 tiles a split, as with 32
    assert key_splits(4, 8, 64, 132, 24640) == 8       # 64 new tokens: 256 CTAs (9 would make 288)
    assert key_splits(8, 8, 64, 132, 24704) == 4       # 128 new tokens: 256 CTAs (5 would make 320)
