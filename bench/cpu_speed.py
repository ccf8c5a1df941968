"""CPU serving speed, plain SGLang bf16 vs oscar-2, through the same launcher, side by side in one run.

Both servers run at once (an idle SGLang scheduler sleeps), and the measurements alternate between them,
so the load of a shared machine falls on both alike (the load average is recorded with each one). Per
server and concurrency (1 and 8 streams), each stream sends its own 1k-token English context (no radix
hits: the cache is flushed first) and streams greedy tokens back:
  - prefill tok/s: context tokens / time to first token (per stream: median; total: all streams'
    context tokens / time until the last stream's first token);
  - decode tok/s: per stream, (tokens - 1) / (last token - first token), median; total: tokens that
    arrived while every stream was decoding (after the last first token) / that window.
A profile of where a decode step's time goes follows (in-process, same thread count as the servers):
the model's weight matmuls at batch 1 in bf16 and fp32, and one step of attention over 1k tokens for
all layers (oscar's batched torch path vs SDPA over bf16 K/V).

    python bench/cpu_speed.py              # -> bench/results/cpu_speed.json, cpu_speed.png
    python bench/cpu_speed.py --plot-only  # redraw the PNG from the JSON
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from sglang_oscar.serve import Server

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {"bf16": ["--oscar-method", "bf16"], "oscar-2": ["--oscar-method", "oscar", "--oscar-bits", "2"]}


def english_ids(tokenizer, n_tokens, seed):
    from pydoc_data.topics import topics

    keys = sorted(k for k, v in topics.items() if len(v) > 6000)
    ids = []
    i = seed
    while len(ids) < n_tokens:  # long enough: concatenate topics
        ids += tokenizer(topics[keys[i % len(keys)]])["input_ids"]
        i += 7
    return ids[:n_tokens]


def stream_one(url, ids, n_new, out):
    """POST /generate streaming; out gets (send time, [(time, completion tokens so far), ...])."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": n_new, "temperature": 0, "ignore_eos": True}}
    t0 = time.perf_counter()
    marks = []
    with requests.post(url + "/generate", json=body, stream=True, timeout=1800) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            n = json.loads(line[5:])["meta_info"]["completion_tokens"]
            if n and (not marks or n > marks[-1][1]):
                marks.append((time.perf_counter(), n))
    out.append((t0, marks))


def measure(srv, contexts, n_new):
    srv.flush()
    load = os.getloadavg()
    runs = []
    threads = [threading.Thread(target=stream_one, args=(srv.url, ids, n_new, runs)) for ids in contexts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == len(contexts) and all(m and m[-1][1] == n_new for _, m in runs), runs
    ctx = len(contexts[0])
    t_start = min(t0 for t0, _ in runs)
    ttft = [m[0][0] - t0 for t0, m in runs]
    dec = [(m[-1][1] - m[0][1]) / (m[-1][0] - m[0][0]) for _, m in runs]
    all_first = max(m[0][0] for _, m in runs)
    t_end = max(m[-1][0] for _, m in runs)
    # tokens that arrived after every stream had started decoding
    steady = sum(n_b - n_a for _, m in runs for (t_a, n_a), (t_b, n_b) in zip(m, m[1:]) if t_a >= all_first)
    return {"streams": len(contexts), "context_tokens": ctx, "new_tokens": n_new,
            "prefill_tok_s_per_stream": statistics.median(ctx / x for x in ttft),
            "prefill_tok_s_total": len(contexts) * ctx / (all_first - t_start),
            "ttft_s_max": max(ttft),
            "decode_tok_s_per_stream": statistics.median(dec),
            "decode_tok_s_total": steady / (t_end - all_first) if t_end > all_first and steady else None,
            "wall_s": t_end - t_start, "loadavg_before": load, "loadavg_after": os.getloadavg()}


def profile(model_dir, ctx, threads):
    """Where one decode step's time goes, in-process: weight matmuls at batch 1 (bf16 and fp32), and
    attention over `ctx` tokens for every layer (oscar's batched path; SDPA over bf16 K/V)."""
    import torch
    from transformers import AutoConfig

    from sglang_oscar import batched, layout, quant
    from sglang_oscar.backend import store
    from sglang_oscar.config import OscarConfig

    torch.set_num_threads(threads)
    c = AutoConfig.from_pretrained(model_dir)
    L, Dm, I, V = c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    Hq, H = c.num_attention_heads, c.num_key_value_heads
    D = Dm // Hq

    def timed(f, n=5):
        f()
        t = time.perf_counter()
        for _ in range(n):
            f()
        return (time.perf_counter() - t) / n * 1e3

    out = {"threads": threads, "loadavg": os.getloadavg()}
    shapes = [(Hq * D + 2 * H * D, Dm), (Dm, Hq * D), (2 * I, Dm), (Dm, I)]
    for dt, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        ws = [torch.randn(s, dtype=dt) for s in shapes]
        lm = torch.randn(V, Dm, dtype=dt)
        x1, xi = torch.randn(1, Dm, dtype=dt), torch.randn(1, I, dtype=dt)

        def layers():
            for w in ws:
                torch.nn.functional.linear(xi if w.shape[1] == I else x1, w)
        out[f"weights_ms_per_token_{name}"] = {"layers": timed(layers) * L, "lm_head": timed(lambda: x1 @ lm.T)}
        xa, wa = torch.randn(1024, Dm, dtype=dt), ws[2]
        out[f"gemm_gflops_{name}"] = 2 * 1024 * Dm * wa.shape[0] / timed(lambda: xa @ wa.T, 2) / 1e6

    for B in (1, 8):
        cfg = OscarConfig(method="oscar", bits=2, page_size=64)
        P = 64
        npr = ctx // P + 2                          # pages per request; page 0 is SGLang's sink page
        pages = {f: torch.zeros((B * npr + 1, *s), dtype=dt_) for f, (s, dt_) in layout.page_shapes(P, H, D, 2).items()}
        kk = torch.randn(B * npr, P, H, D).to(torch.bfloat16)
        packed = quant.store_pages(kk, kk, cfg)
        for f in layout.FIELDS:
            pages[f][1:] = packed[f]
        res = torch.randn((B + 1, P, H, D)).to(torch.bfloat16)
        slots = (torch.arange(B * npr * P) + P).view(B, npr * P).to(torch.int32)
        req_to_token = torch.cat([torch.zeros_like(slots[:1]), slots])
        q = torch.randn(B, Hq, D).to(torch.bfloat16)
        k = torch.randn(B, H, D).to(torch.bfloat16)

        def oscar_step():
            p = batched.plan(list(range(1, B + 1)), [ctx + 5] * B, [1] * B, cfg, req_to_token, Hq, H, D)
            for _ in range(L):
                batched.forward(p, q, k, k, pages, res, res, cfg, D ** -0.5, store)
        kv = torch.randn(B, H, ctx, D).to(torch.bfloat16)

        def sdpa_step():
            for _ in range(L):
                for b in range(B):  # SGLang's torch_native backend: one SDPA per request
                    torch.nn.functional.scaled_dot_product_attention(
                        q[b:b + 1, :, None].transpose(1, 2).reshape(1, Hq, 1, D), kv[b:b + 1].repeat_interleave(Hq // H, 1),
                        kv[b:b + 1].repeat_interleave(Hq // H, 1))
        out[f"attention_ms_per_step_B{B}"] = {"oscar-2": timed(oscar_step, 2), "bf16_sdpa": timed(sdpa_step, 2)}
    return out


def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("prefill_tok_s_total", "prefill tok/s (total)"), ("decode_tok_s_per_stream", "decode tok/s per stream"),
               ("decode_tok_s_total", "decode tok/s (total)")]
    names = list(res["servers"])
    levels = sorted({r["streams"] for n in names for r in res["servers"][n]["levels"]})
    fig, axes = plt.subplots(1, len(metrics), figsize=(12, 4))
    for ax, (key, label) in zip(axes, metrics):   # one panel per metric: each on its own scale
        for j, n in enumerate(names):
            vals = [next(r[key] or 0 for r in res["servers"][n]["levels"] if r["streams"] == s) for s in levels]
            ax.bar([i + j * 0.4 for i in range(len(levels))], vals, width=0.4, label=n)
        ax.set_xticks([i + 0.2 for i in range(len(levels))], [f"{s} stream(s)" for s in levels])
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"SGLang CPU engine, {res['settings']['context_tokens']}-token context: bf16 vs oscar-2 "
                 "(same launcher, one run)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def cpu_model():
    """The CPU's model name and its bf16 matmul features (where bf16 GEMMs run fast or slow)."""
    from serving import cpu_name   # bench/serving.py, beside this script
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    feats = [f for f in ("avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{cpu_name()} ({platform.machine()}), {' '.join(feats) if feats else 'no AVX-512'}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--budget-gb", type=float, default=0.5)
    ap.add_argument("--extra", nargs="*", default=[], help="more SGLang flags for both servers")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "cpu_speed.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the --out JSON")
    args = ap.parse_args()
    if args.plot_only:
        plot(json.loads(Path(args.out).read_text()), Path(args.out).with_suffix(".png"))
        return
    t0 = time.time()
    logs = Path(tempfile.mkdtemp(prefix="cpu-speed-"))
    servers = {n: Server(["--oscar-kv-budget-gb", str(args.budget_gb), *a, *args.extra],
                         log_path=logs / f"{n}.log") for n, a in METHODS.items()}
    res = {"servers": {n: {"levels": []} for n in servers}}
    try:
        for s in servers.values():
            s.start()
        from transformers import AutoTokenizer
        info = next(iter(servers.values())).info()
        tok = AutoTokenizer.from_pretrained(info["tokenizer_path"])
        for n, s in servers.items():
            i = s.info()
            res["servers"][n]["info"] = {k: i.get(k) for k in ("attention_backend", "dtype", "page_size",
                                                              "max_total_num_tokens", "max_running_requests",
                                                              "oscar")}   # oscar: method, bits, page, prefill mode
            s.generate(english_ids(tok, 64, 99), max_new_tokens=4)   # warm-up
        seed = 0
        for _ in range(args.rounds):
            for streams in args.streams:
                for n, s in servers.items():   # alternate: the same load on both
                    ctxs = [english_ids(tok, args.context, seed + i) for i in range(streams)]
                    seed += 1
                    r = measure(s, ctxs, args.new_tokens)
                    print(n, json.dumps(r), flush=True)
                    res["servers"][n]["levels"].append(r)
    finally:
        for s in servers.values():
            s.stop()
    # several rounds: keep each level's median run (by decode rate)
    for n in res["servers"]:
        lv = res["servers"][n]["levels"]
        by = {}
        for r in lv:
            by.setdefault(r["streams"], []).append(r)
        res["servers"][n]["levels"] = [sorted(v, key=lambda r: r["decode_tok_s_per_stream"])[len(v) // 2]
                                       for _, v in sorted(by.items())]
        res["servers"][n]["all_runs"] = lv
    ratios = {}
    for streams in args.streams:
        b = next(r for r in res["servers"]["bf16"]["levels"] if r["streams"] == streams)
        o = next(r for r in res["servers"]["oscar-2"]["levels"] if r["streams"] == streams)
        ratios[str(streams)] = {k: (o[k] / b[k] if o[k] and b[k] else None)
                                for k in ("prefill_tok_s_total", "decode_tok_s_per_stream", "decode_tok_s_total")}
    res["oscar_over_bf16"] = ratios
    one = next(r for r in res["servers"]["oscar-2"]["levels"] if r["streams"] == 1) if 1 in args.streams else None
    res["goals"] = {"oscar_ge_0.9x_bf16": all(v is not None and v >= 0.9 for r in ratios.values() for v in r.values()),
                    "single_stream_decode_ge_20": bool(one and one["decode_tok_s_per_stream"] >= 20)}
    threads = len(os.sched_getaffinity(0))
    if not args.no_profile:
        res["profile"] = profile(info["model_path"], args.context, threads)
    res["settings"] = {"context_tokens": args.context, "new_tokens": args.new_tokens, "rounds": args.rounds,
                       "kv_budget_gb": args.budget_gb, "extra_flags": args.extra,
                       "model": Path(info["model_path"]).name,
                       "hardware": f"{cpu_model()}, {os.cpu_count()} cores (SGLang CPU engine)",
                       "note": "shared machine: see loadavg_before/after of each run"}
    res["elapsed_s"] = round(time.time() - t0)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, out.with_suffix(".png"))
    print(json.dumps({"oscar_over_bf16": ratios, "goals": res["goals"]}, indent=1))


if __name__ == "__main__":
    main()
