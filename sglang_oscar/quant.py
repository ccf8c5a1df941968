"""OScaR / QuaRot / KIVI quantization math in plain torch: the spec every CUDA kernel is tested against.

Store path (one full page, rounding once): raw post-RoPE K [P, H, D] and V [P, H, D] in the model
dtype -> fp32 -> Hadamard on K (quarot/oscar) -> omni-token norm n_t = ||k_t|| over all heads and
channels (oscar; else 1) -> k_hat = k_rot / n_t -> asymmetric quantization: K per channel over
32-token groups, V per token over 32-channel groups -> packed (layout.py).
V needs no online rotation: for quarot/oscar it is folded into v_proj/o_proj (fold.py).
"""
from __future__ import annotations

import torch

from . import layout
from .config import K_GROUP, V_GROUP, OscarConfig
from .hadamard import hadamard

FP16_MAX = 65504.0


def quantize_groups(x: torch.Tensor, bits: int):
    """Asymmetric quantization of fp32 x over its last dim (one group).

    scale = (max - min) / (2**bits - 1) and zero = min, both stored as fp16; the codes are computed
    against the stored (rounded) values, round-half-to-even, clamped. A constant group gets scale 0
    and is reconstructed as its (fp16) value.
    Returns (codes uint8 [...,n], scale fp16 [...], zero fp16 [...]).
    """
    qmax = (1 << bits) - 1
    x = x.float()
    lo, hi = x.amin(-1), x.amax(-1)
    scale = ((hi - lo) / qmax).clamp(max=FP16_MAX).to(torch.float16)
    zero = lo.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    s, z = scale.float().unsqueeze(-1), zero.float().unsqueeze(-1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    q = torch.round((x - z) / safe).clamp(0, qmax)
    q = torch.where(s > 0, q, torch.zeros_like(q))
    return q.to(torch.uint8), scale, zero


def dequantize_groups(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return codes.float() * scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1)


def norm_sq(k: torch.Tensor) -> torch.Tensor:
    """Squared norm of keys [..., H, D] over their heads and channels (fp32). Under tensor parallelism
    each rank sums its own heads and the ranks add theirs up (the omni-token norm spans all KV heads)."""
    return k.float().square().sum((-2, -1))


def token_norm(k_rot: torch.Tensor, sq: torch.Tensor | None = None) -> torch.Tensor:
    """Omni-token norm of fp32 keys [..., H, D] over all heads and channels, or sqrt(sq) where the
    squared norm over all heads is given; 1 where it is not > 0."""
    n = (norm_sq(k_rot) if sq is None else sq.float()).sqrt()
    return torch.where((n > 0) & torch.isfinite(n), n, torch.ones_like(n))


def prepare_keys(k: torch.Tensor, cfg: OscarConfig, sq: torch.Tensor | None = None):
    """Raw keys [..., H, D] -> (fp32 keys as quantized, fp32 norms [...]) per the method; sq: the
    tokens' squared norms over all KV heads where k holds only some of them (see norm_sq).
    With cfg.key_norm == "head" every KV head has its own norm: norms [..., H] (sq is not needed,
    a rank holds whole heads)."""
    kf = hadamard(k) if cfg.rotate else k.float()
    if cfg.token_norm and cfg.key_norm == "head":
        n = token_norm(kf.unsqueeze(-2)).squeeze(-1)  # each head as a one-head token
        return kf / n[..., None], n
    if cfg.token_norm:
        n = token_norm(kf, sq)
        return kf / n[..., None, None], n
    return kf, torch.ones(kf.shape[:-2], dtype=torch.float32, device=k.device)


def rotate_queries(q: torch.Tensor, cfg: OscarConfig) -> torch.Tensor:
    """Queries [..., D] in the space the packed keys live in (fp32)."""
    return hadamard(q) if cfg.rotate else q.float()


def store_pages(k: torch.Tensor, v: torch.Tensor, cfg: OscarConfig, sq: torch.Tensor | None = None) -> dict:
    """Pack N full pages. k, v: [N, P, H, D] raw (post-RoPE K; V as the folded weights produce it);
    sq [N, P]: the squared token norms over all KV heads when k, v hold only this rank's heads.

    Returns the layout.FIELDS tensors, each with leading dim N. The bytes are a pure function of
    (k, v, cfg): the same prefix stored by any request packs identically (design invariant 4).
    """
    N, P, H, D = k.shape
    bits = cfg.bits
    kq, norm = prepare_keys(k, cfg, sq)  # [N, P, H, D], [N, P] ([N, P, H] per KV head)
    # K: per channel over 32-token groups -> [N, H, G, D, 32]
    kg = kq.view(N, P // K_GROUP, K_GROUP, H, D).permute(0, 3, 1, 4, 2)
    kc, ks, kz = quantize_groups(kg, bits)
    # V: per token over 32-channel groups -> [N, H, P, D/32, 32]
    vg = v.float().view(N, P, H, D // V_GROUP, V_GROUP).permute(0, 2, 1, 3, 4)
    vc, vs, vz = quantize_groups(vg, bits)
    return {
        "k_codes": layout.pack_codes(kc, bits),                          # [N, H, G, D, bits]
        "k_scale": ks, "k_zero": kz,                                      # [N, H, G, D]
        "v_codes": layout.pack_codes(vc.reshape(N, H, P, D), bits),       # [N, H, P, D*bits/32]
        "v_scale": vs, "v_zero": vz,                                      # [N, H, P, D/32]
        "k_norm": norm.float(),                                           # [N, P] or [N, P, H]
    }


def load_pages(pages: dict, bits: int):
    """Dequantize packed pages -> (k_hat [N, P, H, D] fp32, norm [N, P] fp32, v [N, P, H, D] fp32).

    k_hat is in the quantized (rotated, unit-norm for oscar) space: logits use q_rot . k_hat * norm.
    A per-KV-head norm comes back as stored, [N, P, H].
    """
    kc = layout.unpack_codes(pages["k_codes"], bits)                   # [N, H, G, D, 32]
    N, H, G, D, _ = kc.shape
    k = dequantize_groups(kc, pages["k_scale"], pages["k_zero"])        # [N, H, G, D, 32]
    k = k.permute(0, 2, 4, 1, 3).reshape(N, G * K_GROUP, H, D)
    vc = layout.unpack_codes(pages["v_codes"], bits)                    # [N, H, P, D]
    P = vc.shape[2]
    vc = vc.view(N, H, P, D // V_GROUP, V_GROUP)
    v = dequantize_groups(vc, pages["v_scale"], pages["v_zero"]).reshape(N, H, P, D).transpose(1, 2)
    return k, pages["k_norm"].float(), v


def fake_quantize(k: torch.Tensor, v: torch.Tensor, cfg: OscarConfig):
    """Round trip of full pages, back in the raw key space: (k_deq, v_deq) [N, P, H, D] fp32.

    For analysis only (the attention path keeps keys in the rotated space and the norm in logits).
    """
    kh, n, vd = load_pages(store_pages(k, v, cfg), cfg.bits)
    kd = kh * (n[..., None] if n.dim() == 3 else n[..., None, None])
    return (hadamard(kd) if cfg.rotate else kd), vd
