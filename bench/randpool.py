"""Random packed pages for the timing benchmarks: the bytes a real pool holds, with finite scales."""
from __future__ import annotations

import torch

from sglang_oscar import layout


def random_pool(num_pages, P, H, D, bits, device="cuda") -> dict:
    """One layer's pool fields (layout.FIELDS) for num_pages pages of random codes."""
    pool = {}
    for f, (shape, dt) in layout.page_shapes(P, H, D, bits).items():
        t = torch.empty((num_pages, *shape), dtype=dt, device=device)
        if dt == torch.int32:
            t.random_(-2**31, 2**31 - 1)
        elif f == "k_norm":
            t.uniform_(0.5, 2.0)
        else:
            t.uniform_(-0.1, 0.1)
        pool[f] = t
    return pool
