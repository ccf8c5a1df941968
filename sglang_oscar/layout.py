"""The packed page layout: the one place that defines how a full KV page is stored.

A page holds `P` consecutive tokens of one request (P = page_size, a multiple of 32) for all `H`
KV heads of one layer, as five tensors, each with a leading page axis in the pool:

    k_codes  int32  [H, P/32, D, bits]    K codes, per 32-token group and channel: `bits` words
                                          hold the group's 32 tokens; token j of the group sits in
                                          word j // (32/bits) at bit bits*(j % (32/bits)).
    k_scale  fp16   [H, P/32, D]          K step per (group, channel)
    k_zero   fp16   [H, P/32, D]          K offset (the group minimum): k = code*scale + zero
    v_codes  int32  [H, P, D*bits/32]     V codes, per token: word w holds channels
                                          w*(32/bits) ...; channel c at bit bits*(c % (32/bits)).
    v_scale  fp16   [H, P, D/32]          V step per (token, 32-channel group)
    v_zero   fp16   [H, P, D/32]          V offset per (token, group)
    k_norm   fp32   [P]                   omni-token norm of each token (1 for kivi/quarot)

Why this shape: a decode CTA for KV head h streams one page as contiguous runs (one run per
tensor); K's channel-major words let a thread fold q*scale into one FMA per code, V's token-major
words let a thread own a channel slice. Scales are fp16 (not bf16) for their 11-bit mantissa; the
zero is the float group minimum, so the group's endpoints are represented exactly up to fp16.
"""
from __future__ import annotations

import torch

from .config import K_GROUP, V_GROUP

FIELDS = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero", "k_norm")


def page_shapes(page_size: int, head_num: int, head_dim: int, bits: int) -> dict:
    P, H, D = page_size, head_num, head_dim
    return {
        "k_codes": ((H, P // K_GROUP, D, bits), torch.int32),
        "k_scale": ((H, P // K_GROUP, D), torch.float16),
        "k_zero": ((H, P // K_GROUP, D), torch.float16),
        "v_codes": ((H, P, D * bits // 32), torch.int32),
        "v_scale": ((H, P, D // V_GROUP), torch.float16),
        "v_zero": ((H, P, D // V_GROUP), torch.float16),
        "k_norm": ((P,), torch.float32),
    }


def bytes_per_token(head_num: int, head_dim: int, bits: int) -> float:
    """Real stored bytes per token per layer (page-size independent)."""
    H, D = head_num, head_dim
    k = D * bits / 8 + (D / K_GROUP) * 4  # codes + fp16 scale/zero per channel per 32 tokens
    v = D * bits / 8 + (D / V_GROUP) * 4  # codes + fp16 scale/zero per 32 channels
    return H * (k + v) + 4  # + fp32 omni norm, shared by the layer's heads


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[..., n] integer codes < 2**bits -> int32 words [..., n*bits/32], element i at bits*(i % per)."""
    per = 32 // bits
    n = codes.shape[-1]
    if n % per:
        raise ValueError(f"cannot pack {n} codes into whole {per}-code words")
    c = codes.to(torch.int64).reshape(*codes.shape[:-1], n // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (c << shifts).sum(-1)  # < 2**32, exact in int64
    return (words - (words >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # two's complement view


def unpack_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words [..., m] -> uint8 codes [..., m*32/bits]; the exact inverse of pack_codes."""
    per = 32 // bits
    shifts = torch.arange(per, device=words.device, dtype=torch.int32) * bits
    c = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # arithmetic shift is fine after masking
    return c.reshape(*words.shape[:-1], words.shape[-1] * per).to(torch.uint8)
