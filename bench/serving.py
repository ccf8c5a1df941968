"""Serving load test over HTTP: multi-turn chats against bf16, oscar-2 and oscar-4 SGLang servers.

    python bench/serving.py            # full run (starts one server per method, one after another)
    python bench/serving.py --quick    # smoke run
    python bench/serving.py --url http://host:port --methods oscar-2   # drive a running server

Workload: N simulated users, each a 4-8 turn chat sharing one long system prompt plus its own growing
history (the radix cache's favourite case), streamed, greedy, a fixed number of output tokens
(ignore_eos) so TPOT is comparable. Concurrency = users chatting at once. Every method runs with the
same KV memory budget (--oscar-kv-budget-gb) on the same machine.

Admission experiment (separate, per method): a small KV budget, many long unique prompts sent at once;
the number of requests SGLang runs together is read from the scheduler itself (/v1/loads'
num_running_reqs, polled while they run), so it is the pool's capacity that limits it, not the client.

Writes bench/results/serving.json and serving.png.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import sys
import time

import aiohttp
import requests
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from sglang_oscar.serve import Server  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = {"bf16": ("bf16", 16), "oscar-2": ("oscar", 2), "oscar-4": ("oscar", 4),
           "kivi-2": ("kivi", 2), "quarot-2": ("quarot", 2)}
TOPICS = ["the Roman empire", "volcanoes", "jazz", "chess openings", "bread baking", "the moon",
          "honey bees", "railways", "glaciers", "origami", "coral reefs", "the printing press"]
QUESTIONS = ["Tell me one fact about {t}.", "Why does that matter?", "Give an example.",
             "Summarise that in one sentence.", "What is a common misconception?", "Who studies it?",
             "What should a beginner read first?", "Thanks! Anything else?"]


def system_prompt(n_rules=8) -> str:
    # ~190 tokens shared by every user (3 pages of 64): what the radix cache should serve from memory.
    rules = " ".join(f"Rule {i}: when a user asks about topic number {i}, answer briefly, politely and "
                     f"accurately, and never invent sources." for i in range(n_rules))
    return "You are a knowledgeable, concise assistant for a public library. " + rules


def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def find_num(d, key):
    """A numeric field anywhere in a nested /v1/loads answer."""
    if isinstance(d, dict):
        if isinstance(d.get(key), (int, float)):
            return d[key]
        for v in d.values():
            r = find_num(v, key)
            if r is not None:
                return r
    return None


async def poll_loads(session, url, samples, stop):
    """Sample the scheduler's own load (running requests, used tokens) until `stop` is set."""
    while not stop.is_set():
        try:
            async with session.get(url + "/v1/loads", timeout=aiohttp.ClientTimeout(total=30)) as r:
                load = (await r.json())["loads"][0]
            samples.append({k: find_num(load, k) for k in
                            ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "max_total_num_tokens")})
        except Exception:  # noqa: BLE001 - a missed sample only lowers the resolution
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def stream_chat(session, url, messages, max_tokens):
    """One streamed chat completion: (text, record) with TTFT/TPOT and usage."""
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = last = None
    text, usage = [], None
    async with session.post(url + "/v1/chat/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    text.append(piece)
    if first is None or usage is None:
        raise RuntimeError("stream ended without content or usage")
    out = usage["completion_tokens"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return "".join(text), {"ttft": first - t0, "tpot": (last - first) / (out - 1) if out > 1 else None,
                           "prompt": usage["prompt_tokens"], "cached": cached, "out": out}


async def run_level(url, concurrency, users, turns, max_tokens, seed, desc):
    """`users` conversations, `concurrency` of them at once; each turn waits for the previous answer."""
    rng = random.Random(seed)
    system = system_prompt()
    plans = [(u, rng.choice(TOPICS), rng.randint(*turns)) for u in range(users)]
    records, errors = [], []
    bar = tqdm(total=sum(p[2] for p in plans), desc=desc, unit="req", leave=False)
    queue = asyncio.Queue()
    for p in plans:
        queue.put_nowait(p)
    samples, stop = [], asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency + 4)) as session:
        async def user_worker():
            while not queue.empty():
                u, topic, n = queue.get_nowait()
                msgs = [{"role": "system", "content": system}]
                for turn in range(n):
                    q = QUESTIONS[turn % len(QUESTIONS)].format(t=topic)
                    msgs.append({"role": "user", "content": f"(visitor {u}) {q}" if turn == 0 else q})
                    try:
                        text, rec = await stream_chat(session, url, msgs, max_tokens)
                        records.append(rec)
                        msgs.append({"role": "assistant", "content": text})
                    except Exception as e:  # noqa: BLE001 - counted, the conversation ends
                        errors.append(repr(e)[:300])
                        bar.update(n - turn)
                        break
                    bar.update(1)

        poller = asyncio.create_task(poll_loads(session, url, samples, stop))
        t0 = time.perf_counter()
        await asyncio.gather(*[user_worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
        stop.set()
        await poller
    bar.close()
    ttft = [r["ttft"] * 1000 for r in records]
    tpot = [r["tpot"] * 1000 for r in records if r["tpot"] is not None]
    prompt = sum(r["prompt"] for r in records)
    used = [s["num_used_tokens"] for s in samples if s["num_used_tokens"] is not None]
    running = [s["num_running_reqs"] for s in samples if s["num_running_reqs"] is not None]
    total = next((s["max_total_num_tokens"] for s in samples if s["max_total_num_tokens"]), None)
    return {"concurrency": concurrency, "users": users, "requests": len(records), "wall_s": wall,
            "req_per_s": len(records) / wall, "out_tok_per_s": sum(r["out"] for r in records) / wall,
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tpot_p50_ms": pct(tpot, 50), "tpot_p99_ms": pct(tpot, 99),
            "mean_prompt_tokens": prompt / max(1, len(records)),
            "cache_hit_rate": sum(r["cached"] for r in records) / max(1, prompt),
            "errors": len(errors), "error_samples": errors[:3],
            "peak_used_tokens": max(used) if used else None, "max_total_num_tokens": total,
            "peak_pool_usage": max(used) / total if used and total else None,
            "peak_running_reqs": max(running) if running else None}


async def run_admission(url, n_requests, prompt_tokens, max_new_tokens, seed):
    """Many long unique prompts at once; the scheduler's peak running count is what the pool admits."""
    rng = random.Random(seed)
    samples, stop = [], asyncio.Event()
    finished = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800),
                                     connector=aiohttp.TCPConnector(limit=n_requests + 4)) as session:
        async def one(i):
            ids = [rng.randrange(1000, 40000) for _ in range(prompt_tokens)]  # unique: no prefix sharing
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                                          "ignore_eos": True}}
            async with session.post(url + "/generate", json=body) as r:
                finished.append(r.status == 200 and len((await r.json())["output_ids"]) == max_new_tokens)

        poller = asyncio.create_task(poll_loads(session, url, samples, stop))
        t0 = time.perf_counter()
        with tqdm(total=n_requests, desc="admission", unit="req", leave=False) as bar:
            async def tracked(i):
                try:
                    await one(i)
                except Exception:  # noqa: BLE001 - counted as not finished
                    finished.append(False)
                bar.update(1)
            await asyncio.gather(*[tracked(i) for i in range(n_requests)])
        wall = time.perf_counter() - t0
        stop.set()
        await poller
    running = [s["num_running_reqs"] for s in samples if s["num_running_reqs"] is not None]
    used = [s["num_used_tokens"] for s in samples if s["num_used_tokens"] is not None]
    return {"requests": n_requests, "prompt_tokens": prompt_tokens, "max_new_tokens": max_new_tokens,
            "max_concurrent_running": max(running) if running else None, "samples": len(samples),
            "peak_used_tokens": max(used) if used else None,
            "max_total_num_tokens": next((s["max_total_num_tokens"] for s in samples
                                          if s["max_total_num_tokens"]), None),
            "finished_ok": sum(finished), "wall_s": wall}


def server_args(method, budget_gb, max_running):
    m, bits = METHODS[method]
    args = ["--oscar-method", m, "--oscar-kv-budget-gb", str(budget_gb), "--enable-cache-report",
            "--max-running-requests", str(max_running),
            "--load-snapshot-publish-interval", "1"]  # /v1/loads current after every scheduler step
    return args + (["--oscar-bits", str(bits)] if m != "bf16" else [])


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware():
    try:
        import torch
        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} GPU"
    except Exception:  # noqa: BLE001
        pass
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({cpu_name()}), no GPU"


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for method in dict.fromkeys(r["method_name"] for r in result["rows"]):
        rows = sorted((r for r in result["rows"] if r["method_name"] == method), key=lambda r: r["concurrency"])
        c = [r["concurrency"] for r in rows]
        axes[0].plot(c, [r["out_tok_per_s"] for r in rows], "o-", label=method)
        axes[1].plot(c, [r["ttft_p50_ms"] for r in rows], "o-", label=method)
        axes[2].plot(c, [r["tpot_p50_ms"] for r in rows], "o-", label=method)
    for ax, title in zip(axes[:3], ["output tokens/s", "TTFT p50 (ms)", "TPOT p50 (ms)"]):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent users")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    adm = result.get("admission", {}).get("runs", [])
    if adm:
        names = [a["method_name"] for a in adm]
        axes[3].bar(names, [a["max_concurrent_running"] or 0 for a in adm], color="tab:green")
        axes[3].set_title(f"max running requests at {result['admission']['budget_gb']} GB KV", fontsize=9)
    fig.suptitle(f"{result['model']} on {result['hardware']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    # SIGTERM (a timeout, a CI cancel) must still run the `finally` that stops the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="drive this running server instead of starting servers")
    ap.add_argument("--methods", default="bf16,oscar-2,oscar-4")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--budget-gb", type=float, default=0.5,
                    help="identical KV memory for every method (small, so admission is memory-bound)")
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=4)
    ap.add_argument("--admission-requests", type=int, default=64)
    ap.add_argument("--admission-prompt", type=int, default=1024)
    ap.add_argument("--no-admission", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke run: two small levels, tiny admission")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--log-dir", default=None, help="server logs (default: not kept)")
    a = ap.parse_args()
    methods = a.methods.split(",")
    levels = [int(c) for c in a.concurrency.split(",")]
    if a.quick:
        levels, a.admission_requests, a.admission_prompt = [1, 4], 6, 200
    # Users and turns per level: every user chats 4-8 turns (at least 2 users, so c=1 also sees
    # another conversation's pages in the cache).
    def plan(c):
        if a.quick:
            return max(2, c), (2, 2)
        return max(2, c), (4, 8)

    os.makedirs(a.out, exist_ok=True)
    tag = "serving-quick" if a.quick else "serving"
    result = {"hardware": hardware(), "model": None, "budget_gb": a.budget_gb, "max_tokens": a.max_tokens,
              "max_running_requests": a.max_running, "rows": []}
    adm_runs = []
    t_start = time.time()

    def save():
        # Written after every level, so an interrupted run still leaves what it measured.
        if adm_runs:
            result["admission"] = {
                "budget_gb": a.budget_gb, "max_running_requests": a.max_running,
                "method": "N long unique prompts (no shared prefix) sent at once, after /flush_cache, to the "
                          "same server and KV budget; max_concurrent_running is the peak of the scheduler's "
                          "num_running_reqs (/v1/loads, polled every 0.25 s) while they run, so the KV pool, "
                          "not the client, bounds it (the request-slot cap is max_running_requests)",
                "runs": adm_runs}
        result["wall_s"] = time.time() - t_start
        with open(os.path.join(a.out, tag + ".json"), "w") as f:
            json.dump(result, f, indent=1)

    for method in methods:
        m, bits = METHODS[method]
        log = os.path.join(a.log_dir, f"{method}.log") if a.log_dir else None
        server = None
        if a.url:
            url = a.url
        else:
            server = Server(server_args(method, a.budget_gb, a.max_running), log_path=log).start()
            url = server.url
        try:
            info = requests.get(url + "/server_info", timeout=120).json()
            result["model"] = os.path.basename(info["model_path"].rstrip("/")) or info["model_path"]
            for c in levels:
                users, turns = plan(c)
                row = asyncio.run(run_level(url, c, users, turns, a.max_tokens, seed=c,
                                            desc=f"{method} c={c}"))
                row.update(method=m, bits=bits, method_name=method)
                result["rows"].append(row)
                save()
                tqdm.write(f"{method:8s} c={c:3d} {row['req_per_s']:.2f} req/s {row['out_tok_per_s']:.1f} tok/s "
                           f"TTFT p50 {row['ttft_p50_ms']:.0f} ms TPOT p50 {row['tpot_p50_ms'] or 0:.0f} ms "
                           f"hit {row['cache_hit_rate']:.2f} err {row['errors']} "
                           f"peak pool {row['peak_pool_usage'] or 0:.3f}")
            if not a.no_admission:
                requests.post(url + "/flush_cache", timeout=120)
                run = asyncio.run(run_admission(url, a.admission_requests, a.admission_prompt, 8, seed=7))
                run.update(method=m, bits=bits, method_name=method)
                adm_runs.append(run)
                save()
                tqdm.write(f"{method:8s} admission: {run['max_concurrent_running']} running at once "
                           f"(pool {run['max_total_num_tokens']} tokens)")
        finally:
            if server:
                server.stop()
    save()
    plot(result, os.path.join(a.out, tag + ".png"))
    print(f"wrote {os.path.join(a.out, tag)}.json/.png in {result['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
