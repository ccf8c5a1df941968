"""Stand-ins for the few SGLang objects the oscar backend reads, to drive OscarAttnBackend.detached
outside SGLang's model runner: the paged pool, a ForwardBatch, an attention layer.

Shared by the backend tests and bench/accuracy.py --attention backend (which puts this folder on
sys.path), so every driver of the detached backend builds its fakes the same way.
"""
from __future__ import annotations

import types

import torch

from sglang_oscar import layout


class FakePool:
    """OscarKVPool's per-layer view: packed pages (layout.FIELDS, leading page axis) and the raw
    residual rows [R, P, H, D] that hold each request's partial last page."""

    def __init__(self, n_layers, num_pages, R, P, H, D, bits, dtype, dev):
        self.pages = [{f: torch.zeros((num_pages, *s), dtype=dt, device=dev)
                       for f, (s, dt) in layout.page_shapes(P, H, D, bits).items()} for _ in range(n_layers)]
        self.res_k = [torch.zeros((R, P, H, D), dtype=dtype, device=dev) for _ in range(n_layers)]
        self.res_v = [torch.zeros((R, P, H, D), dtype=dtype, device=dev) for _ in range(n_layers)]
        self.head_dim = D

    def layer(self, i):
        return self.pages[i], self.res_k[i], self.res_v[i]


def batch(rows, seq, ext, decode, dev):
    """A ForwardBatch: request rows, seq_lens (cached + new tokens), extend lengths (None in decode)."""
    mode = types.SimpleNamespace(is_decode=lambda: decode, is_decode_or_idle=lambda: decode)
    return types.SimpleNamespace(req_pool_indices=torch.tensor(rows, device=dev),
                                 seq_lens=torch.tensor(seq, device=dev), seq_lens_cpu=torch.tensor(seq),
                                 extend_seq_lens_cpu=ext, forward_mode=mode)


def decode_batch(rows, seq, dev):
    return batch(rows, seq, None, True, dev)


def fake_layer(layer_id, Hq, H, D, scaling=None):
    """A RadixAttention layer as the backend sees it: causal self-attention, no softcap or window."""
    return types.SimpleNamespace(tp_q_head_num=Hq, tp_k_head_num=H, qk_head_dim=D, layer_id=layer_id,
                                 scaling=D ** -0.5 if scaling is None else scaling, is_cross_attention=False,
                                 logit_cap=0, sliding_window_size=-1)
