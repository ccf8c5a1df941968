"""Normalized Sylvester Walsh-Hadamard transform along the last dim (per head), computed in fp32.

H[i, j] = (-1)^popcount(i & j) / sqrt(n): symmetric and orthogonal, so H is its own inverse and
(H q) . (H k) = q . k. The butterfly is O(n log n); `hadamard_matrix` is the dense twin for tests
and weight folding.
"""
from __future__ import annotations

import math

import torch


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def hadamard_matrix(n: int, dtype=torch.float64, device=None) -> torch.Tensor:
    if not is_power_of_two(n):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    idx = torch.arange(n, device=device)
    bits = torch.bitwise_and(idx[:, None], idx[None, :])
    parity = torch.zeros_like(bits)
    while bool(bits.any()):
        parity ^= bits & 1
        bits = bits >> 1
    return ((1 - 2 * parity).to(dtype)) / math.sqrt(n)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """H x along the last dim, in fp32 (returns fp32)."""
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    src = x.float().reshape(-1, n)
    # Each stage writes its sums and differences straight into the other of two buffers (the same
    # floats as stacking fresh a + b and a - b, a third of the memory traffic); never into x itself.
    bufs = [torch.empty_like(src), torch.empty_like(src) if n > 2 else None]
    h, i = 1, 0
    while h < n:
        a = src.view(-1, n // (2 * h), 2, h)
        dst = bufs[i % 2]
        o = dst.view(-1, n // (2 * h), 2, h)
        torch.add(a[:, :, 0], a[:, :, 1], out=o[:, :, 0])
        torch.sub(a[:, :, 0], a[:, :, 1], out=o[:, :, 1])
        src, h, i = dst, h * 2, i + 1
    if n == 1:
        src = src.clone()
    return src.mul_(1.0 / math.sqrt(n)).view(x.shape)
