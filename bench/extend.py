"""Prefill (extend) attention of the oscar backend on CUDA: one layer, one request, a chunk of T new
tokens after a cached prefix of S tokens, through the backend itself (scratch raw pages, one page
store launch, the decode kernel with one query per token; with chunk prefill, the decode kernel over
the prefix pages and a ragged bf16 prefill over the raw keys, merged), against its per-request torch
path and bf16 flash attention (torch SDPA) over the same keys.

    python bench/extend.py [--out bench/results]     -> extend_h200.json + extend_h200.png
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sglang_oscar import ops  # noqa: E402
from sglang_oscar.backend import OscarAttnBackend  # noqa: E402
from sglang_oscar.config import OscarConfig  # noqa: E402
from randpool import random_pool  # noqa: E402

DEV = "cuda"
P = 64
SHAPES = [(32, 8, 128), (9, 3, 64)]             # Llama-3.1-8B, SmolLM2-135M heads
CASES = [(0, 2048), (0, 8192), (8192, 8192), (24576, 8192)]   # (cached prefix S, chunk T)
TORCH_PATH_MAX = 8192                           # the torch path is timed up to this many keys
RAGGED = None                                   # what ran chunk prefill's in-chunk part


def setup(hq, hkv, d, S, T, kernels, prefill="page"):
    cfg = OscarConfig(method="oscar", bits=2, page_size=P, prefill=prefill)
    n_pages = (S + T) // P + 2
    pages = random_pool(n_pages, P, hkv, d, 2, DEV)
    res_k = torch.zeros(2, P, hkv, d, device=DEV, dtype=torch.bfloat16)
    res_v = torch.zeros_like(res_k)
    req_to_token = torch.zeros((2, (n_pages - 1) * P), dtype=torch.int32, device=DEV)
    req_to_token[1] = torch.arange(P, (n_pages) * P, device=DEV, dtype=torch.int32)  # pages 1.. in order
    pool = types.SimpleNamespace(layer=lambda i: (pages, res_k, res_v))
    be = OscarAttnBackend.detached(cfg, pool, req_to_token, DEV, use_kernels=kernels)
    layer = types.SimpleNamespace(tp_q_head_num=hq, tp_k_head_num=hkv, qk_head_dim=d, layer_id=0,
                                  scaling=d ** -0.5, is_cross_attention=False, logit_cap=0, sliding_window_size=-1)
    fb = types.SimpleNamespace(req_pool_indices=torch.tensor([1], device=DEV),
                               seq_lens=torch.tensor([S + T], device=DEV), seq_lens_cpu=torch.tensor([S + T]),
                               extend_seq_lens_cpu=[T], forward_mode=types.SimpleNamespace(is_decode=lambda: False))
    q = torch.randn(T, hq * d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(T, hkv * d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn(T, hkv * d, device=DEV, dtype=torch.bfloat16)
    return be, layer, fb, q, k, v


def time_backend(hq, hkv, d, S, T, kernels, iters, prefill="page"):
    be, layer, fb, q, k, v = setup(hq, hkv, d, S, T, kernels, prefill)
    h0 = time.perf_counter()
    be.init_forward_metadata(fb)
    be.forward_extend(q, k, v, layer, fb)          # plans (host) and warms up
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - h0) * 1000
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        out = be.forward_extend(q, k, v, layer, fb)
    b.record()
    b.synchronize()
    assert torch.isfinite(out).all()
    if prefill == "chunk":
        global RAGGED
        RAGGED = "flashinfer" if be._ragged.use_flashinfer else "torch"
    return a.elapsed_time(b) / iters, first_ms


def time_sdpa(hq, hkv, d, S, T, iters=10):
    from torch.nn.attention.bias import causal_lower_right
    q = torch.randn(1, hq, T, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, S + T, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = causal_lower_right(T, S + T) if S else None
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)  # outside the timing

    def f():
        if S:
            return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(6 * len(SHAPES), 4.5))
    for ax, (hq, hkv, d) in zip(axes, SHAPES):
        rs = [r for r in rows if (r["hq"], r["hkv"], r["d"]) == (hq, hkv, d)]
        xs = range(len(rs))
        w = 0.2
        for i, (key, label) in enumerate([("oscar_ms", "oscar-2 kernel path (page prefill)"),
                                          ("oscar_chunk_ms", "oscar-2 kernel path (chunk prefill)"),
                                          ("bf16_sdpa_ms", "bf16 SDPA (flash)"),
                                          ("torch_path_ms", "oscar-2 torch path")]):
            ax.bar([x + (i - 1.5) * w for x in xs], [r.get(key) or 0 for r in rs], w, label=label)
        ax.set_xticks(list(xs), [f"S={r['prefix']}\nT={r['chunk']}" for r in rs])
        ax.set_yscale("log")
        ax.set_ylabel("ms per layer")
        ax.set_title(f"prefill attention, {hq}/{hkv} heads d={d}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ops.load()
    rows = []
    for hq, hkv, d in SHAPES:
        for S, T in CASES:
            ms, first = time_backend(hq, hkv, d, S, T, True, iters=5)
            r = dict(hq=hq, hkv=hkv, d=d, bits=2, page_size=P, prefix=S, chunk=T, oscar_ms=round(ms, 3),
                     first_call_ms=round(first, 1), bf16_sdpa_ms=round(time_sdpa(hq, hkv, d, S, T), 3),
                     tokens_per_s_per_layer=round(T / ms * 1000))
            r["oscar_chunk_ms"] = round(time_backend(hq, hkv, d, S, T, True, iters=5, prefill="chunk")[0], 3)
            if S + T <= TORCH_PATH_MAX:
                r["torch_path_ms"] = round(time_backend(hq, hkv, d, S, T, False, iters=1)[0], 2)
            rows.append(r)
            print(f"{hq}/{hkv} d={d} S={S} T={T}: kernel path {ms:.2f} ms/layer (first call incl. plan {first:.1f} ms), "
                  f"chunk prefill {r['oscar_chunk_ms']:.2f} ms, bf16 SDPA {r['bf16_sdpa_ms']:.2f} ms, "
                  f"torch path {r.get('torch_path_ms')} ms", flush=True)
    props = torch.cuda.get_device_properties(0)
    result = dict(rows=rows, hardware=dict(gpu=props.name, torch=torch.__version__, cuda=torch.version.cuda),
                  chunk_ragged=RAGGED,
                  notes="one layer, one request; oscar_ms = forward_extend through the backend with CUDA kernels "
                        "(scratch raw pages + page store + one decode-kernel query per token), mean of 5 calls "
                        "after a planning call; oscar_chunk_ms = the same with --oscar-prefill chunk (prefix pages through the "
                        "decode kernel with lse, the raw keys through a ragged causal prefill, merged; chunk_ragged "
                        "says which ragged prefill ran); torch_path_ms = the backend's per-request torch path; bf16_sdpa_ms "
                        "= torch SDPA over S+T bf16 keys (flash, causal; the prefix cases repeat the KV heads).")
    with open(os.path.join(a.out, "extend_h200.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(a.out, "extend_h200.png"))


if __name__ == "__main__":
    main()
