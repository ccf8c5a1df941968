"""Prefill (extend) attention of the oscar backend on CUDA: one layer, one request, a chunk of T new
tokens after a cached prefix of S tokens, through the backend itself (raw scratch, one page store
launch for the pages the step completes, the residual tail, the extend kernel), in both prefill
modes, against bf16 flash attention (torch SDPA) over the same keys; the extend kernel alone is
timed too (kernel_ms, the same step's attention without the scratch and the store).

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
CASES = [(0, 2048), (8192, 2048), (24576, 2048), (0, 8192), (8192, 8192), (24576, 8192)]  # (prefix S, chunk T)


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


def cuda_ms(f, iters):
    f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        f()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / iters


def time_backend(hq, hkv, d, S, T, iters, prefill="page"):
    """(whole forward_extend ms, extend kernel alone ms, first call incl. planning ms)."""
    from sglang_oscar.extend import fill_scratch, run_extend
    be, layer, fb, q, k, v = setup(hq, hkv, d, S, T, True, prefill)
    h0 = time.perf_counter()
    be.init_forward_metadata(fb)
    out = be.forward_extend(q, k, v, layer, fb)          # plans (host) and warms up
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - h0) * 1000
    assert torch.isfinite(out).all()
    ms = cuda_ms(lambda: be.forward_extend(q, k, v, layer, fb), iters)
    pages, res_k, res_v = be.token_to_kv_pool.layer(0)
    raw_k, raw_v = fill_scratch(k, v, res_k, res_v, be._extend_batch)
    qh = q.view(T, hq, d)
    kern = cuda_ms(lambda: run_extend(qh, pages, raw_k, raw_v, be._extend_batch, be.cfg, layer.scaling), iters)
    return ms, kern, first_ms


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
    return cuda_ms(f, iters)


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(SHAPES), figsize=(6 * len(SHAPES), 4.5))
    for ax, (hq, hkv, d) in zip(axes, SHAPES):
        rs = [r for r in rows if (r["hq"], r["hkv"], r["d"]) == (hq, hkv, d)]
        xs = range(len(rs))
        w = 0.27
        for i, (key, label) in enumerate([("oscar_ms", "oscar-2 extend (page prefill)"),
                                          ("oscar_chunk_ms", "oscar-2 extend (chunk prefill)"),
                                          ("bf16_sdpa_ms", "bf16 SDPA (flash)")]):
            ax.bar([x + (i - 1) * w for x in xs], [r[key] for r in rs], w, label=label)
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
            r = dict(hq=hq, hkv=hkv, d=d, bits=2, page_size=P, prefix=S, chunk=T)
            for mode, key in (("page", "oscar"), ("chunk", "oscar_chunk")):
                ms, kern, first = time_backend(hq, hkv, d, S, T, iters=10, prefill=mode)
                r.update({f"{key}_ms": round(ms, 3), f"{key}_kernel_ms": round(kern, 3),
                          f"{key}_first_call_ms": round(first, 1)})
            r["bf16_sdpa_ms"] = round(time_sdpa(hq, hkv, d, S, T), 3)
            r["ratio_page"] = round(r["oscar_ms"] / r["bf16_sdpa_ms"], 2)
            r["ratio_chunk"] = round(r["oscar_chunk_ms"] / r["bf16_sdpa_ms"], 2)
            rows.append(r)
            print(f"{hq}/{hkv} d={d} S={S} T={T}: page {r['oscar_ms']:.3f} ms (kernel {r['oscar_kernel_ms']:.3f}), "
                  f"chunk {r['oscar_chunk_ms']:.3f} ms (kernel {r['oscar_chunk_kernel_ms']:.3f}), "
                  f"bf16 SDPA {r['bf16_sdpa_ms']:.3f} ms: {r['ratio_page']}x / {r['ratio_chunk']}x", flush=True)
    import importlib.util
    props = torch.cuda.get_device_properties(0)
    result = dict(rows=rows, hardware=dict(gpu=props.name, torch=torch.__version__, cuda=torch.version.cuda),
                  flashinfer_installed=importlib.util.find_spec("flashinfer") is not None,
                  notes="one layer, one request, oscar-2; oscar_ms / oscar_chunk_ms = forward_extend through the "
                        "backend (raw scratch + page store + residual tail + the extend kernel), page and chunk "
                        "prefill, mean of 10 calls after a planning call; *_kernel_ms = the extend kernel alone; "
                        "bf16_sdpa_ms = torch SDPA (flash) over S+T bf16 keys, causal (the prefix cases repeat the "
                        "KV heads outside the timing); FlashInfer's prefill is the other bf16 baseline the goal "
                        "names, but it is not installed on this machine (flashinfer_installed).")
    with open(os.path.join(a.out, "extend_h200.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, os.path.join(a.out, "extend_h200.png"))


if __name__ == "__main__":
    main()
