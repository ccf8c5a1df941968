"""Prefill (extend) attention of the oscar backend on CUDA: one layer, one request, a chunk of T new
tokens after a cached prefix of S tokens, through the backend itself (raw scratch, one page store
launch for the pages the step completes, the residual tail, the extend kernel), in both prefill
modes, against bf16 flash attention (torch SDPA) over the same keys. The backend takes the flash path
(flash.py: dequantize the pages once, FlashAttention varlen, merge) for steps of flash.MIN_TOKENS new
tokens or more (by the cached prefix and head_dim) and the extend kernel below; both are timed alone
too (*_kernel_ms, *_flash_ms: the step's attention without the scratch and the store), which is where
MIN_TOKENS comes from (--sweep).

    python bench/extend.py [--out bench/results]     -> extend_<gpu>.json + extend_<gpu>.png (h200, h100, ...)
    python bench/extend.py --sweep                   -> extend_sweep_<gpu>.json + .png: the extend kernel alone
        against the flash path alone over a grid of prefixes and chunks, where flash.py's thresholds come from
"""
from __future__ import annotations

import argparse
import json
import os
import re
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
CASES = [(24576, 16), (24576, 64), (24576, 128), (24576, 256), (24576, 512), (8192, 128), (2048, 128),
         (0, 512),      # (prefix S, chunk T)
         (0, 2048), (8192, 2048), (24576, 2048), (0, 8192), (8192, 8192), (24576, 8192)]
SWEEP = [(S, T) for S in (0, 2048, 8192, 24576) for T in (128, 256, 384, 512, 768, 1024, 2048, 4096)]


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
    """(whole forward_extend ms, extend kernel alone ms, flash path alone ms, first call incl. planning ms,
    the path the backend took)."""
    from sglang_oscar.extend import fill_scratch, run_extend
    be, layer, fb, q, k, v = setup(hq, hkv, d, S, T, True, prefill)
    h0 = time.perf_counter()
    be.init_forward_metadata(fb)
    out = be.forward_extend(q, k, v, layer, fb)          # plans (host) and warms up
    torch.cuda.synchronize()
    first_ms = (time.perf_counter() - h0) * 1000
    assert torch.isfinite(out).all()
    ms = cuda_ms(lambda: be.forward_extend(q, k, v, layer, fb), iters)
    plan = be._extend_batch
    path = "flash" if plan.use_flash else "kernel"
    pages, res_k, res_v = be.token_to_kv_pool.layer(0)
    raw_k, raw_v = fill_scratch(k, v, res_k, res_v, plan)
    qh = q.view(T, hq, d)
    alone = {}
    for use in (False, True):
        plan.use_flash = use
        alone[use] = cuda_ms(lambda: run_extend(qh, pages, raw_k, raw_v, plan, be.cfg, layer.scaling), iters)
    splits = max(b.splits for b in plan.blocks.values())   # the extend kernel's key splits
    return ms, alone[False], alone[True], first_ms, path, splits


def time_sdpa(hq, hkv, d, S, T, iters=10, backend=None):
    """bf16 SDPA over S+T keys, causal: torch's own dispatch (backend None) or one backend forced."""
    from torch.nn.attention import sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right
    q = torch.randn(1, hq, T, d, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(1, hkv, S + T, d, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    mask = causal_lower_right(T, S + T) if S else None
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)  # outside the timing

    def f():
        if S:
            return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
        return torch.nn.functional.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    if backend is None:
        return cuda_ms(f, iters)
    with sdpa_kernel([backend]):
        return cuda_ms(f, iters)


def figure(rows):
    """(figure, [(axis, shape)]): one panel per head shape measured so far."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = [sh for sh in SHAPES if any((r["hq"], r["hkv"], r["d"]) == sh for r in rows)]
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    return fig, list(zip(axes[0], shapes))


def plot(rows, path):
    fig, panels = figure(rows)
    for ax, (hq, hkv, d) in panels:
        rs = [r for r in rows if (r["hq"], r["hkv"], r["d"]) == (hq, hkv, d)]
        xs = range(len(rs))
        w = 0.27
        for i, (key, label) in enumerate([("oscar_ms", "oscar-2 (page prefill)"),
                                          ("oscar_chunk_ms", "oscar-2 (chunk prefill)"),
                                          ("bf16_sdpa_ms", "bf16 SDPA")]):
            ax.bar([x + (i - 1) * w for x in xs], [r[key] for r in rs], w, label=label)
        kt = lambda n: f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)  # noqa: E731
        ax.set_xticks(list(xs), [f"{kt(r['prefix'])}\n+{kt(r['chunk'])}" for r in rs], fontsize=8)
        ax.set_xlabel("cached prefix + chunk (tokens)")
        ax.set_yscale("log")
        ax.set_ylabel("ms per layer")
        ax.set_title(f"prefill attention, {hq}/{hkv} heads d={d}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_sweep(rows, path):
    """The extend kernel's time over the flash path's (both alone, page prefill) against the chunk."""
    fig, panels = figure(rows)
    for ax, (hq, hkv, d) in panels:
        for S in sorted({r["prefix"] for r in rows}):
            rs = [r for r in rows if (r["hq"], r["hkv"], r["d"], r["prefix"]) == (hq, hkv, d, S)]
            ax.plot([r["chunk"] for r in rs], [r["oscar_kernel_ms"] / r["oscar_flash_ms"] for r in rs],
                    marker="o", label=f"prefix {S}")
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("new tokens in the step")
        ax.set_ylabel("extend kernel ms / flash path ms")
        ax.set_title(f"{hq}/{hkv} heads d={d}: above 1 the flash path is faster", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def result_path(out: str, name: str = "extend") -> str:
    """out/<name>_<gpu>.json (h200, h100, ...)."""
    m = re.search(r"\b([A-Z]\d{2,3})\b", torch.cuda.get_device_properties(0).name)
    return os.path.join(out, f"{name}_{m.group(1).lower() if m else 'gpu'}.json")


def write(rows, path):
    import importlib.util
    props = torch.cuda.get_device_properties(0)
    from sglang_oscar import flash
    rule = {d: [list(b) for b in t] for d, t in flash.MIN_TOKENS.items()}
    result = dict(rows=rows, flash_rule=dict(min_tokens=rule), hardware=dict(gpu=props.name, torch=torch.__version__, cuda=torch.version.cuda),
                  flashinfer_installed=importlib.util.find_spec("flashinfer") is not None,
                  notes="one layer, one request, oscar-2; oscar_ms / oscar_chunk_ms = forward_extend through the "
                        "backend (raw scratch + page store + residual tail + attention by the path it takes, *_path: "
                        "flash where flash_rule says so: min_tokens[head_dim] lists (cached prefix tokens at least, new tokens needed)), page and chunk prefill, mean of 10 "
                        "calls after a planning call; *_kernel_ms / *_flash_ms = the step's attention alone "
                        "through the extend kernel (*_kernel_splits: its key splits per query block) / the flash path "
                        "(dequantize, FlashAttention varlen, merge); "
                        "bf16_sdpa_ms = torch SDPA over S+T bf16 keys, causal, its own backend choice (the KV heads "
                        "repeated outside the timing; a prefix needs the lower-right causal mask, which only its "
                        "FlashAttention-2 backend takes; with no prefix it may pick cuDNN), bf16_fa2_ms = the same "
                        "with FlashAttention-2 forced (the kernel the flash path runs), bf16_sdpa_tflops = the "
                        "step's attention FLOPs per second at bf16_sdpa_ms; FlashInfer's prefill is the other bf16 baseline the goal "
                        "names, but it is not installed on this machine (flashinfer_installed).")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--sweep", action="store_true", help="the flash-threshold grid instead of the cases")
    ap.add_argument("--shape", action="append", help="HQ/HKV/D, repeatable (default: all of SHAPES)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    ops.load()
    rows = []
    path = result_path(a.out, "extend_sweep" if a.sweep else "extend")
    shapes = [tuple(map(int, x.split("/"))) for x in a.shape] if a.shape else SHAPES
    for hq, hkv, d in shapes:
        for S, T in SWEEP if a.sweep else CASES:
            r = dict(hq=hq, hkv=hkv, d=d, bits=2, page_size=P, prefix=S, chunk=T)
            for mode, key in (("page", "oscar"), ("chunk", "oscar_chunk")):
                ms, kern, fl, first, taken, splits = time_backend(hq, hkv, d, S, T, iters=10, prefill=mode)
                r.update({f"{key}_ms": round(ms, 3), f"{key}_path": taken, f"{key}_kernel_ms": round(kern, 3),
                          f"{key}_kernel_splits": splits,
                          f"{key}_flash_ms": round(fl, 3), f"{key}_first_call_ms": round(first, 1)})
            from torch.nn.attention import SDPBackend
            r["bf16_sdpa_ms"] = round(time_sdpa(hq, hkv, d, S, T), 3)
            r["bf16_fa2_ms"] = round(time_sdpa(hq, hkv, d, S, T, backend=SDPBackend.FLASH_ATTENTION), 3)
            # attention FLOPs of the step (QK and PV, causal), per second at SDPA's time
            r["bf16_sdpa_tflops"] = round(4 * T * (S + (T + 1) / 2) * d * hq / r["bf16_sdpa_ms"] / 1e9, 1)
            r["ratio_page"] = round(r["oscar_ms"] / r["bf16_sdpa_ms"], 2)
            r["ratio_chunk"] = round(r["oscar_chunk_ms"] / r["bf16_sdpa_ms"], 2)
            rows.append(r)
            print(f"{hq}/{hkv} d={d} S={S} T={T}: page {r['oscar_ms']:.3f} ms ({r['oscar_path']}; kernel "
                  f"{r['oscar_kernel_ms']:.3f} flash {r['oscar_flash_ms']:.3f}), chunk {r['oscar_chunk_ms']:.3f} ms "
                  f"({r['oscar_chunk_path']}; kernel {r['oscar_chunk_kernel_ms']:.3f} flash "
                  f"{r['oscar_chunk_flash_ms']:.3f}), bf16 SDPA {r['bf16_sdpa_ms']:.3f} ms: "
                  f"{r['ratio_page']}x / {r['ratio_chunk']}x (SDPA {r['bf16_sdpa_tflops']} TFLOP/s; FA2 forced "
                  f"{r['bf16_fa2_ms']:.3f} ms)", flush=True)
            write(rows, path)   # after every row: a run cut short keeps what it measured
        (plot_sweep if a.sweep else plot)(rows, path.replace(".json", ".png"))


if __name__ == "__main__":
    main()
