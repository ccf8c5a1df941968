"""bf16 SGLang vs oscar-2 beyond one GPU, through SGLang's own tensor and data parallelism, in one run.

    python bench/gpu_parallel.py --out DIR --tokenizer TOKDIR     # two CUDA GPUs (bench/gpu_parallel.sh)

Model: random weights of Llama-3.1-8B's shape (8 KV heads), with --layers layers (default 16: four servers
share two GPUs). Phases, each with every server of it started at once:
  * tp: bf16 and oscar-2 at TP=1 (one GPU each) and at TP=2 (both GPUs). The KV budget is the same in
    total: --budget-gb for a TP=1 server, half of it per rank at TP=2. Measured: capacity
    (max_total_num_tokens) of all four; TP=1 vs TP=2 equivalence (greedy tokens of prompts long enough
    to fill many packed pages, and the teacher-forced log-probabilities of the TP=1 tokens on both);
    at TP=2 the capacity-bound decode (8k-token prompts, as many as each pool holds) and SGLang's
    bench_serving shared-prefix multi-turn load at one concurrency.
  * dp: bf16 and oscar-2 at DP=2 (SGLang's data-parallel controller, one replica per GPU, --budget-gb
    per replica): capacity, capacity-bound decode and the same bench_serving load.
Every request's errors are counted. Writes OUT/gpu_parallel.json, OUT/gpu_parallel.png, OUT/summary.txt.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gpu_serving as gs  # noqa: E402  (checkpoint, servers, clients: the single-GPU driver's pieces)
import serving  # noqa: E402
from gpu_serving import log  # noqa: E402

METHODS = ("bf16", "oscar-2")


def all_nums(d, key):
    """Every numeric `key` in a nested answer (one per DP replica in /server_info)."""
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            if k == key and isinstance(v, (int, float)):
                out.append(v)
            else:
                out += all_nums(v, key)
    elif isinstance(d, list):
        for v in d:
            out += all_nums(v, key)
    return out


def flags(method, model, a, budget, par):
    f = gs.server_flags(method, model, argparse.Namespace(budget_gb=budget, max_running=a.max_running,
                                                          dry_run=a.dry_run, mem_fraction=a.mem_fraction))
    return f + ([] if a.dry_run else par)   # a dry run checks the driver with one-rank servers


# ---- TP=1 vs TP=2: the same tokens ----------------------------------------------------------------
def generate(url, ids, **kw):
    r = requests.post(url + "/generate", timeout=300, json={"input_ids": ids, **kw})
    r.raise_for_status()
    return r.json()


def equivalence(up, a):
    """Per method: greedy tokens of each prompt on TP=1 and TP=2, and the TP=1 tokens teacher-forced on
    both (log-probabilities of the same tokens, so one early divergence does not hide the rest)."""
    rng = random.Random(11)
    prompts = [[rng.randrange(1000, 40000) for _ in range(n)] for n in a.eq_lens for _ in range(a.eq_per_len)]
    greedy = {"max_new_tokens": a.eq_new, "temperature": 0, "ignore_eos": True}
    out = {}
    for m in METHODS:
        u1, u2 = up.get(f"{m}-tp1"), up.get(f"{m}-tp2")
        if not (u1 and u2):
            continue
        rows = []
        for p in prompts:
            toks = {}
            for tag, u in (("tp1", u1), ("tp2", u2)):
                toks[tag] = generate(u, p, sampling_params=greedy)["output_ids"]
            forced = {}
            for tag, u in (("tp1", u1), ("tp2", u2)):
                r = generate(u, p + toks["tp1"], sampling_params={"max_new_tokens": 1, "temperature": 0},
                             return_logprob=True, logprob_start_len=len(p) - 1)
                lp = r["meta_info"]["input_token_logprobs"]
                forced[tag] = [x[0] for x in lp[-len(toks["tp1"]):]]
            same = next((i for i, (x, y) in enumerate(zip(toks["tp1"], toks["tp2"])) if x != y), len(toks["tp1"]))
            gaps = [abs(x - y) for x, y in zip(forced["tp1"], forced["tp2"]) if x is not None and y is not None]
            rows.append({"prompt_len": len(p), "identical": toks["tp1"] == toks["tp2"], "first_divergence": same,
                         "lp_gap_mean": sum(gaps) / len(gaps) if gaps else None, "lp_gap_max": max(gaps, default=None)})
        n = len(rows)
        out[m] = {"prompts": n, "new_tokens": a.eq_new,
                  "identical_fraction": sum(r["identical"] for r in rows) / n,
                  "prefix_agreement": sum(r["first_divergence"] for r in rows) / (n * a.eq_new),
                  "lp_gap_mean": sum(r["lp_gap_mean"] or 0 for r in rows) / n,
                  "lp_gap_max": max((r["lp_gap_max"] or 0 for r in rows), default=None), "rows": rows}
        log(f"equivalence {m}: identical {out[m]['identical_fraction']:.2f}, prefix agreement "
            f"{out[m]['prefix_agreement']:.2f}, teacher-forced |dlogp| mean {out[m]['lp_gap_mean']:.4f} "
            f"max {out[m]['lp_gap_max']:.3f}")
    return out


# ---- load: capacity-bound decode, one bench_serving level -------------------------------------------
def capacity_bound(url, a, tokens_total, deadline):
    n = max(1, min(a.max_running * a.replicas, int(tokens_total * 0.95) // (a.long_ctx + a.long_new + 64)))
    requests.post(url + "/flush_cache", timeout=60)
    return asyncio.run(gs.long_ctx_run(url, n, a.long_ctx, a.long_new, seed=3,
                                       timeout_s=max(30, deadline - time.time() - 30)))


def bench_level(run, a, up, model, work, tag):
    """One shared-prefix multi-turn level per server through SGLang's own client."""
    b = argparse.Namespace(**{**vars(a), "levels": str(a.level), "convs": str(a.convs)})
    sub = {m: up[f"{m}-{tag}"] for m in METHODS if f"{m}-{tag}" in up}
    runs = [r for r in gs.bench_serving_plan(b, sub, model, os.path.join(work, "bench_serving"))
            if r["kind"] == "gsp"]
    for r in runs:
        r["name"] = f"{r['name']}-{tag}"
        r["argv"][r["argv"].index("--output-file") + 1] = os.path.join(work, "bench_serving", r["name"] + ".jsonl")
    saved = run.res.get("bench_serving")
    orig = gs.bench_serving_plan
    gs.bench_serving_plan = lambda *_: runs
    try:
        gs.run_bench_serving(run, b, sub, model, work)
    finally:
        gs.bench_serving_plan = orig
    rows = run.res["bench_serving"]["runs"]
    if saved:
        saved["runs"] += rows
        run.res["bench_serving"] = saved
    return rows


def phase_servers(run, specs, work):
    srv = gs.start_all(specs, os.path.join(work, "logs"), timeout=max(60, min(300, run.left() - 60)))
    up = {}
    for name, s in srv.items():
        entry = run.res["servers"][name] = {"flags": next(x[1] for x in specs if x[0] == name)}
        if isinstance(s, gs.Server):
            up[name] = s.url
            try:
                entry["effective"] = gs.effective_settings(gs.server_info(s.url))
            except Exception as e:  # noqa: BLE001
                entry["effective"] = f"server_info failed: {e!r}"
        else:
            entry["error"] = repr(s)
        log(f"server {name}: {'up ' + s.url if isinstance(s, gs.Server) else 'FAILED ' + repr(s)}")
    return srv, up


def capacities(run, up):
    for name, u in up.items():
        info = gs.server_info(u)
        # SGLang's own figure (one scheduler's pool: a TP rank holds its heads of every token, a DP
        # replica its own requests); every value the answer holds is kept to show they agree
        run.res["capacity"][name] = {"tokens": serving.find_num(info, "max_total_num_tokens"),
                                     "values_in_server_info": all_nums(info, "max_total_num_tokens")}
        log(f"capacity {name}: {run.res['capacity'][name]}")


def warm(up):
    rng = random.Random(7)
    for u in up.values():
        for n in (100, 1000):
            generate(u, [rng.randrange(1000, 40000) for _ in range(n)],
                     sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
        requests.post(u + "/flush_cache", timeout=60)


def load_phase(run, a, up, ckpt, work, tag, replicas):
    a.replicas = replicas
    for m in METHODS:
        name = f"{m}-{tag}"
        if name not in up:
            continue
        # a request lives on one replica (DP) or on all ranks at once (TP: each holds its heads of every token)
        total = run.res["capacity"][name]["tokens"] * replicas
        row = run.phase(f"capacity-bound {name}", lambda: capacity_bound(up[name], a, total, run.deadline),
                        need_s=60)
        if row:
            row["server"] = name
            run.res["capacity_bound"].append(row)
            log(f"capacity-bound {name}: {row['concurrency']} x {a.long_ctx}, decode "
                f"{row.get('decode_tok_per_s') or 0:.1f} tok/s, errors {row['errors']}")
    run.phase(f"bench-serving {tag}", lambda: bench_level(run, a, up, ckpt, work, tag), need_s=60)


# ---- results ----------------------------------------------------------------------------------------
def ratios(R):
    cap = {n: c["tokens"] for n, c in R["capacity"].items()}
    out = {}
    for tag in ("tp1", "tp2", "dp2"):
        b, o = cap.get(f"bf16-{tag}"), cap.get(f"oscar-2-{tag}")
        out[f"capacity_{tag}"] = o / b if b and o else None
    t1, t2 = out.get("capacity_tp1"), out.get("capacity_tp2")
    out["capacity_tp2_vs_tp1"] = t2 / t1 if t1 and t2 else None
    out["capacity_dp2_vs_tp1"] = out["capacity_dp2"] / t1 if t1 and out.get("capacity_dp2") else None
    cb = {r["server"]: r.get("decode_tok_per_s") for r in R["capacity_bound"]}
    for tag in ("tp2", "dp2"):
        b, o = cb.get(f"bf16-{tag}"), cb.get(f"oscar-2-{tag}")
        out[f"capacity_bound_decode_{tag}"] = o / b if b and o else None
    gsp = {r["name"]: (r.get("result") or {}).get("output_throughput")
           for r in (R.get("bench_serving") or {}).get("runs", [])}
    for tag in ("tp2", "dp2"):
        b = next((v for k, v in gsp.items() if k.startswith("gsp-bf16-") and k.endswith(tag)), None)
        o = next((v for k, v in gsp.items() if k.startswith("gsp-oscar-2-") and k.endswith(tag)), None)
        out[f"gsp_output_throughput_{tag}"] = o / b if b and o else None
    out["capacity_bound_errors"] = sum(r["errors"] for r in R["capacity_bound"])
    out["bench_serving_runs_not_ok"] = [r["name"] for r in (R.get("bench_serving") or {}).get("runs", [])
                                        if r["status"] != "ok" or not r.get("result")]
    R["ratios"] = out


def plot(R, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    color = {"bf16": "tab:gray", "oscar-2": "tab:blue"}
    tags = ("tp1", "tp2", "dp2")
    for i, m in enumerate(METHODS):
        vals = [(R["capacity"].get(f"{m}-{t}", {}).get("tokens") or 0) * (2 if t == "dp2" else 1) for t in tags]
        axes[0].bar([j + 0.4 * i for j in range(3)], vals, 0.4, color=color[m], label=m)
    axes[0].set_xticks([j + 0.2 for j in range(3)], ["TP=1", "TP=2", "DP=2 (both replicas)"])
    axes[0].set_title("KV capacity (tokens), same total budget at TP=1/TP=2", fontsize=9)
    axes[0].legend(fontsize=8)
    cb = {r["server"]: r for r in R["capacity_bound"]}
    names = [n for n in (f"{m}-{t}" for t in ("tp2", "dp2") for m in METHODS) if n in cb]
    axes[1].bar(names, [cb[n].get("decode_tok_per_s") or 0 for n in names],
                color=[color["bf16" if n.startswith("bf16") else "oscar-2"] for n in names])
    axes[1].set_title(f"capacity-bound decode tok/s ({R['setup']['long_ctx']}-token prompts)", fontsize=9)
    axes[1].tick_params(axis="x", labelsize=7)
    runs = [r for r in (R.get("bench_serving") or {}).get("runs", []) if r.get("result")]
    axes[2].bar([r["name"] for r in runs], [r["result"].get("output_throughput") or 0 for r in runs],
                color=[color["bf16" if "bf16" in r["name"] else "oscar-2"] for r in runs])
    axes[2].set_title(f"bench_serving shared-prefix multi-turn, concurrency {R['setup']['level']}: output tok/s",
                      fontsize=9)
    axes[2].tick_params(axis="x", labelsize=7)
    fig.suptitle(f"bf16 vs oscar-2 with SGLang's TP/DP on {R['hardware'].get('name')} x2 "
                 f"(8B shape, {R['setup']['layers']} layers, random weights)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summary(R):
    f = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    out = ["", f"== gpu_parallel summary ({R['hardware'].get('name')}) ==", "phases: " + json.dumps(R["phases"])]
    for n, c in R["capacity"].items():
        out.append(f"capacity {n:14s} {c['tokens']} tokens {c['values_in_server_info']}")
    for m, e in (R.get("equivalence") or {}).items():
        out.append(f"TP1 vs TP2 {m:8s}: identical {f(e['identical_fraction'])}, prefix agreement "
                   f"{f(e['prefix_agreement'])}, teacher-forced |dlogp| mean {f(e['lp_gap_mean'], 4)} "
                   f"max {f(e['lp_gap_max'], 3)}")
    for r in R["capacity_bound"]:
        out.append(f"capacity-bound {r['server']:14s} {r['concurrency']:3d} x {r['ctx']}: decode "
                   f"{f(r.get('decode_tok_per_s'), 1)} tok/s, errors {r['errors']}")
    for r in (R.get("bench_serving") or {}).get("runs", []):
        res = r.get("result") or {}
        out.append(f"{r['name']:24s} {r['status'][:8]:8s} done {res.get('completed', '-')} out "
                   f"{f(res.get('output_throughput'), 1)} tok/s TTFT p50 {f(res.get('median_ttft_ms'), 0)} ms "
                   f"TPOT p50 {f(res.get('median_tpot_ms'))} ms")
    out.append("ratios: " + json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in R["ratios"].items()}))
    out.append(f"wall {f(R.get('wall_s'), 0)} s")
    return "\n".join(out) + "\n"


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--deadline-s", type=float, default=540)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--budget-gb", type=float, default=4.0, help="KV budget of a TP=1 server / a DP replica")
    ap.add_argument("--max-running", type=int, default=128)
    ap.add_argument("--mem-fraction", type=float, default=0.3)
    ap.add_argument("--skip", default="")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, one-rank servers: checks the driver")
    ap.add_argument("--wait-file", default=None, help="start no server before this file exists")
    ap.add_argument("--eq-lens", default="300,1500,5000")
    ap.add_argument("--eq-per-len", type=int, default=4)
    ap.add_argument("--eq-new", type=int, default=32)
    ap.add_argument("--long-ctx", type=int, default=8192)
    ap.add_argument("--long-new", type=int, default=64)
    ap.add_argument("--level", type=int, default=128, help="bench_serving --max-concurrency")
    ap.add_argument("--convs", type=int, default=128)
    ap.add_argument("--gsp-groups", type=int, default=4)
    ap.add_argument("--gsp-system-len", type=int, default=2048)
    ap.add_argument("--gsp-question-len", type=int, default=128)
    ap.add_argument("--gsp-output-len", type=int, default=128)
    ap.add_argument("--gsp-turns", type=int, default=2)
    ap.add_argument("--need-level-s", type=float, default=20)
    a = ap.parse_args()
    a.eq_lens = [int(x) for x in a.eq_lens.split(",")]
    a.out, a.tokenizer = os.path.abspath(a.out), os.path.abspath(a.tokenizer)
    a.need_long_s, a.longest_ctx, a.longest_new, a.longest_prompts = 0, 0, 0, 0
    if a.dry_run:   # CPU, tiny model, every server at one rank: checks the whole driver, measures nothing
        a.eq_lens, a.eq_per_len, a.eq_new, a.long_ctx, a.long_new = [100, 300], 1, 4, 300, 8
        a.level, a.convs, a.gsp_groups, a.gsp_system_len, a.gsp_question_len, a.gsp_output_len = 2, 4, 2, 48, 8, 4
        a.budget_gb, a.max_running, a.deadline_s = 0.05, 8, max(a.deadline_s, 2400)
    os.makedirs(a.out, exist_ok=True)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 20e9 else None
    work = tempfile.mkdtemp(prefix="gpu_parallel_", dir=shm)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    os.makedirs(os.path.join(work, "bench_serving"), exist_ok=True)
    run = gs.Run(a)
    run.work = work
    run.deadline = gs.T0 + a.deadline_s
    R = run.res
    R["capacity"], R["equivalence"] = {}, {}
    run.save = lambda: open(os.path.join(a.out, "gpu_parallel.json"), "w").write(
        run.paths_out(json.dumps(R, indent=1, default=str)))
    shape = dict(gs.SHAPE, num_hidden_layers=a.layers)
    if a.dry_run:
        shape.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=49152)
        R["notes"].append("DRY RUN on the CPU: tiny model, TP/DP flags dropped, numbers mean nothing")
    R["setup"] = {"model": gs.MODEL, "shape": shape, "layers": a.layers, "sglang": gs.sglang_version(),
                  "budget_gb_tp1_server": a.budget_gb, "budget_gb_tp2_rank": a.budget_gb / 2,
                  "budget_gb_dp_replica": a.budget_gb, "max_running_requests": a.max_running,
                  "long_ctx": a.long_ctx, "level": a.level, "gsp_turns": a.gsp_turns,
                  "args": {k: v for k, v in vars(a).items() if k not in ("out", "tokenizer")}}
    R["notes"] += [
        "random weights of Llama-3.1-8B's shape with fewer layers (four servers share two GPUs); the same flags "
        "for both methods but the method (bf16 on SGLang's triton backend, as in gpu_serving.json); decode CUDA "
        "graphs on",
        "TP=1 servers get --oscar-kv-budget-gb B on one GPU, TP=2 servers B/2 per rank (the same total), DP=2 "
        "servers B per replica; capacity = SGLang's max_total_num_tokens of one scheduler (a TP rank or a DP replica)",
        "equivalence: greedy tokens on TP=1 and TP=2, and the TP=1 tokens teacher-forced on both "
        "(input_token_logprobs); bf16 is the control (its all-reduce rounds differently at TP=2 too)"]
    os.chdir(work)
    ckpt = run.phase("checkpoint", lambda: gs.make_checkpoint(os.path.join(work, gs.MODEL), shape, a.tokenizer,
                                                              "cpu" if a.dry_run else "cuda"))
    if not ckpt:
        return finish(run, work)
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if a.wait_file:   # the caller builds the CUDA extension meanwhile: servers must not race to build it
        t = time.time()
        while not os.path.exists(a.wait_file) and time.time() - t < 240:
            time.sleep(1)
        log(f"waited {time.time() - t:.0f}s for {a.wait_file}")

    if "tp" not in a.skip.split(","):
        specs = []
        for i, m in enumerate(METHODS):
            specs.append((f"{m}-tp1", flags(m, ckpt, a, a.budget_gb, []), {"CUDA_VISIBLE_DEVICES": str(i)}))
            specs.append((f"{m}-tp2", flags(m, ckpt, a, a.budget_gb / 2, ["--tp-size", "2"])))
        srv, up = phase_servers(run, specs, work)
        try:
            run.phase("capacity tp", lambda: capacities(run, up))
            run.phase("warm-up tp", lambda: warm(up))
            R["equivalence"] = run.phase("equivalence", lambda: equivalence(up, a), need_s=60) or {}
            for m in METHODS:   # the TP=1 servers are done: their GPU time goes to the TP=2 load
                s = srv.get(f"{m}-tp1")
                if isinstance(s, gs.Server):
                    gs.stop_all([s])
            load_phase(run, a, up, ckpt, work, "tp2", replicas=1)
        finally:
            gs.stop_all([s for s in srv.values() if isinstance(s, gs.Server)])
    if "dp" not in a.skip.split(",") and run.left() > 150:
        specs = [(f"{m}-dp2", flags(m, ckpt, a, a.budget_gb, ["--dp-size", "2"])) for m in METHODS]
        srv, up = phase_servers(run, specs, work)
        try:
            run.phase("capacity dp", lambda: capacities(run, up))
            run.phase("warm-up dp", lambda: warm(up))
            load_phase(run, a, up, ckpt, work, "dp2", replicas=2)
        finally:
            gs.stop_all([s for s in srv.values() if isinstance(s, gs.Server)])
    elif "dp" not in a.skip.split(","):
        R["phases"]["dp"] = "skipped (time)"
    finish(run, work)


def finish(run, work):
    R = run.res
    R["wall_s"] = time.time() - gs.T0
    try:
        ratios(R)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    run.save()
    gs.write_outputs(run, work, lambda path: plot(R, path), "gpu_parallel.png", summary(R))


if __name__ == "__main__":
    main()
