"""Fold the per-head V rotation into the weights: v' = H v via v_proj rows, undone by o_proj columns.

With W_v <- blockdiag(H) W_v (and its bias) the cache holds H v; attention outputs are then
rotated too, and W_o <- W_o blockdiag(H) maps them back. H is symmetric and orthogonal, so the
model computes the same function; no runtime cost. Query head g reads KV head g // (Hq/Hkv), whose
rotation is the same H, so o_proj's column blocks all use H.
"""
from __future__ import annotations

import torch

from .hadamard import hadamard_matrix


@torch.no_grad()
def rotate_rows(weight: torch.Tensor, head_dim: int) -> None:
    """In place: each head_dim block of output rows (or bias entries) <- H @ block."""
    h = hadamard_matrix(head_dim, torch.float64, weight.device)
    w = weight.double().reshape(-1, head_dim, *weight.shape[1:])
    w = torch.einsum("ij,bj...->bi...", h, w)
    weight.copy_(w.reshape(weight.shape).to(weight.dtype))


@torch.no_grad()
def rotate_cols(weight: torch.Tensor, head_dim: int) -> None:
    """In place: each head_dim block of input columns <- block @ H."""
    h = hadamard_matrix(head_dim, torch.float64, weight.device)
    w = weight.double().reshape(weight.shape[0], -1, head_dim) @ h
    weight.copy_(w.reshape(weight.shape).to(weight.dtype))


def fold_v_rotation(v_weight, o_weight, head_dim, v_bias=None) -> None:
    """v_weight [Hkv*D, hidden] (rows may be a slice view of a fused qkv weight), o_weight [hidden, Hq*D]."""
    rotate_rows(v_weight, head_dim)
    if v_bias is not None:
        rotate_rows(v_bias, head_dim)
    rotate_cols(o_weight, head_dim)
