"""The packed KV pool: SGLang's MHA pool with full pages stored only in OScaR's packed form.

Per layer: the layout.FIELDS tensors with a leading page axis (page 0 is SGLang's sink page), and
a raw (model dtype) residual per request row holding that request's partial last page. Full pages
are packed the moment they fill (backend.py); the radix tree only ever references full pages, so
it only ever sees packed bytes. The residual is indexed by req_pool_idx, like req_to_token.
"""
from __future__ import annotations

import logging

import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from . import layout
from .config import OscarConfig

logger = logging.getLogger(__name__)

# Set by the plugin's hook on the pool builder: rows of SGLang's req_to_token pool (+ padding row).
residual_rows_hint: int | None = None


def residual_bytes(rows: int, page_size: int, head_num: int, head_dim: int, layers: int, itemsize: int,
                   norm_rows: bool = False) -> int:
    """Fixed bytes of the raw partial-page residual (K and V, and under tensor parallelism the fp32
    squared key norms of its tokens) over all layers."""
    return rows * page_size * (head_num * head_dim * 2 * itemsize + 4 * norm_rows) * layers


def norm_rows_needed(cfg: OscarConfig) -> bool:
    """Whether the residual keeps its tokens' squared key norms: a token-norm method whose KV heads
    are split across attention-TP ranks."""
    if not cfg.token_norm:
        return False
    from sglang.srt.runtime_context import get_parallel
    return get_parallel().attn_tp_size > 1


class OscarKVPool(MHATokenToKVPool):
    def __init__(self, *args, **kwargs):
        self.oscar = OscarConfig.from_env()
        if self.oscar is None or not self.oscar.quantized:
            raise RuntimeError("OscarKVPool needs an OScaR config (launch with python -m sglang_oscar.launch_server)")
        if residual_rows_hint is None:
            raise RuntimeError("OscarKVPool: the request-row count was not captured (plugin hook missing)")
        self.residual_rows = residual_rows_hint
        # Raw-byte features (KV copy for speculative decoding, post-capture VA sizing) don't apply.
        kwargs["enable_kv_cache_copy"] = False
        kwargs["post_capture_active"] = False
        super().__init__(*args, **kwargs)

    # ---- buffers ---------------------------------------------------------------------------
    def _create_buffers(self):
        P, H, D = self.page_size, self.head_num, self.head_dim
        if P != self.oscar.page_size:
            raise RuntimeError(f"pool page size {P} != OScaR page size {self.oscar.page_size}")
        if self.v_head_dim != D:
            raise RuntimeError("OScaR needs equal K and V head dims")
        self.num_pages = (self.size + P) // P
        shapes = layout.page_shapes(P, H, D, self.oscar.bits)
        dev = self.device
        # torch.empty: a page is always packed before anything reads it, and on a CPU host
        # zero-filling would make the whole budget resident at start-up.
        self.pages = [
            {f: torch.empty((self.num_pages, *shape), dtype=dt, device=dev) for f, (shape, dt) in shapes.items()}
            for _ in range(self.layer_num)
        ]
        R = self.residual_rows
        self.res_k = [torch.zeros((R, P, H, D), dtype=self.dtype, device=dev) for _ in range(self.layer_num)]
        self.res_v = [torch.zeros((R, P, H, D), dtype=self.dtype, device=dev) for _ in range(self.layer_num)]
        # Tensor parallelism: the residual tokens' squared key norms over all KV heads (fp32, summed
        # across the ranks as they arrive), for the store of the page they complete.
        self.res_sq = ([torch.zeros((R, P), dtype=torch.float32, device=dev) for _ in range(self.layer_num)]
                       if norm_rows_needed(self.oscar) else None)
        # Generic SGLang code only sizes/logs these; nothing reads them as plain K/V.
        self.k_buffer = [p["k_codes"] for p in self.pages]
        self.v_buffer = [p["v_codes"] for p in self.pages]
        self._kv_buffer_descs = []

    def _init_data_ptrs_and_strides(self):
        pass

    def _finalize_allocation_log(self, num_tokens: int):
        # SGLang's own line would call the packed pages "dtype bfloat16" K/V: state what is held.
        from .report import GIB, kv_cache_line, kv_summary
        s = kv_summary(self)
        self.mem_usage = s["total_bytes"] / GIB
        logger.info(kv_cache_line(s))

    def get_kv_size_bytes(self):
        def nbytes(ts):
            return sum(t.numel() * t.element_size() for t in ts)
        k = (nbytes(t for p in self.pages for f, t in p.items() if f.startswith("k_")) + nbytes(self.res_k)
             + nbytes(self.res_sq or []))
        v = nbytes(t for p in self.pages for f, t in p.items() if f.startswith("v_")) + nbytes(self.res_v)
        return k, v

    # ---- access used by the backend ----------------------------------------------------------
    def layer(self, layer_id: int):
        """(packed page tensors, residual K, residual V) of a model layer."""
        i = layer_id - self.start_layer
        return self.pages[i], self.res_k[i], self.res_v[i]

    def layer_norm_sq(self, layer_id: int):
        """The residual's squared key norms [R, P] of a model layer (tensor parallelism only)."""
        return self.res_sq[layer_id - self.start_layer]

    # ---- plain-K/V entry points: a packed pool has none -------------------------------------
    def _no_plain_kv(self, *args, **kwargs):
        raise NotImplementedError(
            "the OScaR pool stores packed pages only; it has no plain K/V buffer "
            "(use the 'oscar' attention backend; HiCache/PD/speculative KV moves are unsupported)")

    get_key_buffer = get_value_buffer = get_kv_buffer = set_kv_buffer = _no_plain_kv
    get_contiguous_buf_infos = get_cpu_copy = load_cpu_copy = move_kv_cache = _no_plain_kv
    get_device_pool_infos = set_kv_buffer_prefix_valid = _no_plain_kv
