"""The shapes OScaR supports, defined once: the torch path's limits and the CUDA kernels' matrix.

The torch reference (CPU, and the fallback on CUDA) works for any page size that is a multiple of the
32-token K group and any power-of-two head_dim >= 32. The CUDA kernels are compiled for the smaller
matrix below and for the listed GPU architectures only; anything outside it runs the torch path.
The bindings (csrc/bindings.cpp) check the same values on their side of the boundary.
"""
from __future__ import annotations

import torch

from .config import K_GROUP, V_GROUP  # noqa: F401 - the quantization groups, re-exported here

BITS = (2, 4)
MIN_HEAD_DIM = 32

KERNEL_PAGE_SIZES = (32, 64, 128)
KERNEL_HEAD_DIMS = (64, 128)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)
# Compute capabilities the kernels are built for, each for its own machine code (ops.target_arch):
# sm_90a and sm_100 stream pages by bulk async copies; sm_80/86/89 by 16-byte cp.async.
KERNEL_ARCHS = ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0))
MAX_HEADS_PER_CTA = 8        # query heads of one KV head per decode CTA (the MMA's N = 8)


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def head_dim_problem(head_dim: int) -> str | None:
    """Why the torch path cannot serve this head_dim (None: it can)."""
    if not is_power_of_two(head_dim) or head_dim < MIN_HEAD_DIM:
        return (f"head_dim {head_dim} is not a power of two >= {MIN_HEAD_DIM} "
                "(the per-head Hadamard and 32-channel V groups need one)")
    return None


def kernel_problem(page_size: int, head_dim: int, bits: int, dtype: torch.dtype | None = None) -> str | None:
    """Why the CUDA kernels cannot run this shape (None: they can)."""
    if page_size not in KERNEL_PAGE_SIZES:
        return f"page size {page_size} (the kernels support {KERNEL_PAGE_SIZES})"
    if head_dim not in KERNEL_HEAD_DIMS:
        return f"head_dim {head_dim} (the kernels support {KERNEL_HEAD_DIMS})"
    if bits not in BITS:
        return f"{bits} bits (the kernels support {BITS})"
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return f"model dtype {dtype} (the kernels support bfloat16 and float16)"
    return None


def arch_supported(capability: tuple[int, int]) -> bool:
    return tuple(capability) in KERNEL_ARCHS
