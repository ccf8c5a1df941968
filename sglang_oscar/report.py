"""What the packed pool holds, in the numbers a user reads: the start-up line, /server_info, metrics."""
from __future__ import annotations

from . import layout

GIB = 1 << 30


def kv_summary(pool) -> dict:
    """Bytes and tokens of an OscarKVPool: packed pages + the raw residual rows of running requests."""
    cfg = pool.oscar
    per_layer = layout.bytes_per_token(pool.head_num, pool.head_dim, cfg.bits)
    bf16_per_layer = pool.head_num * pool.head_dim * 2 * 2  # K and V, 2 bytes each
    # The bytes the pool's tensors really hold, not a formula.
    packed = sum(t.numel() * t.element_size() for layer in pool.pages for t in layer.values())
    residual = sum(t.numel() * t.element_size() for t in (*pool.res_k, *pool.res_v))
    return {"fingerprint": cfg.fingerprint(), "tokens": int(pool.size), "pages": int(pool.num_pages),
            "page_size": int(pool.page_size), "layers": int(pool.layer_num),
            "bytes_per_token": per_layer * pool.layer_num, "bf16_bytes_per_token": bf16_per_layer * pool.layer_num,
            "compression": bf16_per_layer / per_layer, "packed_bytes": int(packed),
            "residual_rows": int(pool.residual_rows), "residual_bytes": int(residual),
            "total_bytes": int(packed + residual)}


def kv_cache_line(s: dict) -> str:
    """The start-up line about the KV cache (SGLang's own would call the packed pages bf16 K/V)."""
    return (f"OScaR KV cache {s['fingerprint']}: {s['tokens']} tokens in {s['pages']} packed pages of "
            f"{s['page_size']}, {s['bytes_per_token']:g} bytes/token over {s['layers']} layers "
            f"(bf16: {s['bf16_bytes_per_token']}, {s['compression']:.2f}x); packed {s['packed_bytes'] / GIB:.3f} GiB "
            f"+ raw residual {s['residual_bytes'] / GIB:.3f} GiB ({s['residual_rows']} request rows) "
            f"= {s['total_bytes'] / GIB:.3f} GiB ({s['total_bytes']} bytes)")
