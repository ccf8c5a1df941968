"""Per-step memory outside SGLang's pool sizing stays bounded whatever the context: the plans of a step hold
O(tokens + pages) indices (no token x page table: an 8k chunk at 128k context would need 64 MB for one),
and the scratches each path allocates per step have fixed caps (the flash path's dequantized keys, the
extend kernel's split partials; the torch path's key blocks: test_batched)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sglang_oscar import extend, flash
from sglang_oscar.config import OscarConfig

P = 64


def tensor_bytes(x, seen=None) -> int:
    """Bytes of every tensor reachable from a plan (dataclasses, tuples, lists, dicts), each counted once."""
    seen = set() if seen is None else seen
    if isinstance(x, torch.Tensor):
        if id(x) in seen:
            return 0
        seen.add(id(x))
        return x.numel() * x.element_size()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return sum(tensor_bytes(getattr(x, f.name), seen) for f in dataclasses.fields(x))
    if isinstance(x, dict):
        return sum(tensor_bytes(v, seen) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in x)
    return 0


def req_to_token_for(reqs):
    """SGLang's req_to_token for requests [(prefix, ext)] on rows 1..B, pages laid out in order."""
    longest = max(a + e for a, e in reqs)
    width = -(-longest // P) * P
    table = torch.zeros((len(reqs) + 1, width), dtype=torch.int32)
    page = 1
    for i, (a, e) in enumerate(reqs):
        n = -(-(a + e) // P)
        table[i + 1, : n * P] = (torch.arange(page, page + n)[:, None] * P + torch.arange(P)).flatten()
        page += n
    return table, page


# an 8k chunk at 128k context; a batch of long and short steps; a chat turn over a long prefix
CASES = [[(120 * 1024, 8192)], [(120 * 1024 + 5, 8192), (3000, 100), (0, 2000), (64, 1)], [(24576 + 17, 16)]]


@pytest.mark.parametrize("prefill", ["page", "chunk"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_extend_and_flash_plans_are_linear_in_tokens_and_pages(case, prefill):
    reqs = CASES[case]
    table, n_pages = req_to_token_for(reqs)
    cfg = OscarConfig(page_size=P, prefill=prefill)
    pre, ext = [a for a, _ in reqs], [e for _, e in reqs]
    rows = torch.arange(1, len(reqs) + 1)
    plan = extend.plan_extend(rows, torch.tensor(pre), torch.tensor(ext), pre, ext, P, table)
    fp = flash.plan_flash(plan, cfg)
    T, B = sum(ext), len(reqs)
    plan.req_to_token = None   # SGLang's own table, already counted in its sizing
    linear = 64 * (T + B * P + n_pages)   # a few int64 indices per token and page
    assert tensor_bytes(plan) <= linear, (tensor_bytes(plan), linear)
    assert tensor_bytes(fp) <= linear, (tensor_bytes(fp), linear)
    if T >= 1024:   # far below a token x page table
        assert tensor_bytes(plan) + tensor_bytes(fp) < T * (n_pages - 1) * 4 / 50


def test_flash_scratch_is_capped():
    """The flash path takes a step only while its dequantized K+V fit SCRATCH_BYTES; above, the extend kernel."""
    H, D = 8, 128
    cap_tokens = flash.SCRATCH_BYTES // (2 * H * D * flash.SCRATCH_DTYPE.itemsize)
    for prefix, fits in ((cap_tokens - 8192, True), (cap_tokens - 8192 + P, False), (200 * 1024, False)):
        table, _ = req_to_token_for([(prefix, 8192)])
        plan = extend.plan_extend(torch.tensor([1]), torch.tensor([prefix]), torch.tensor([8192]), [prefix], [8192],
                                  P, table)
        assert flash.fits(plan, H, D) is fits, prefix


@pytest.mark.parametrize("sms", [108, 132])
@pytest.mark.parametrize("H,g,D", [(8, 4, 128), (3, 3, 64), (1, 8, 128), (2, 1, 64)])
def test_extend_split_partials_are_capped(sms, H, g, D):
    """Splits only where a step fills less than a wave, so their partials stay below the documented cap
    for every chunk and prefix (and there are none once the blocks fill the GPU)."""
    cap = extend.MAX_SPLITS * sms * 2 * 64 * (D + 1) * 4
    worst = 0
    for max_rows in extend.ROWS:
        for T in [1, 7, 16, 63, 64, 65, 200, 500, 1000, 2048, 8192]:
            for prefix in [0, 4095, 24576, 131072]:
                for B in (1, 3):
                    ext = [T] * B
                    rows, tb, count, splits = extend.grid(ext, [prefix] * B, g, H, sms, max_rows)
                    assert 1 <= splits <= extend.MAX_SPLITS
                    if count * H >= sms * (2 if rows == 64 else 1):
                        assert splits == 1
                    worst = max(worst, extend.partials_bytes(T * B, H * g, D, splits))
    assert 0 < worst <= cap, (worst, cap)
