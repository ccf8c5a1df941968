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
    y = x.float().reshape(-1, n)
    h = 1
    while h < n:
        y = y.view(-1, n // (2 * h), 2, h)
        a, b = y[:, :, 0, :], y[:, :, 1, :]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(x.shape) * (1.0 / math.sqrt(n)))
