"""bf16 vs oscar-2 through the real SGLang HTTP server on one CUDA GPU, in one run.

    python bench/gpu_serving.py --out DIR --tokenizer TOKDIR      # (bench/gpu_serving.sh sets the machine up)
    python bench/gpu_serving.py --dry-run ...                     # tiny models, CPU, minutes: checks the logic

Models: random weights of real shapes (no weights can be downloaded where this runs): Llama-3.1-8B's
(32 layers, 32 q / 8 kv heads, d=128, vocab 128256) and SmolLM2-135M's (30 layers, 9/3 heads, d=64).
The 135M model's final norm is scaled up so its greedy argmax has clear margins (random logits are
otherwise near-ties, and agreement would measure tie-breaking, not the kernels).

Every server of one model gets the same flags and the same fixed KV budget (--oscar-kv-budget-gb), so
max_total_num_tokens compares bytes per token. All servers start at once (start-up dominates a short
run) and are measured one after another, never two under load at a time.

Measured:
  * capacity: max_total_num_tokens per method; 32k-token requests the pool holds at once;
  * correctness (135M): greedy tokens of the oscar server (CUDA decode kernels) vs the same server on
    the backend's torch path (SGLANG_OSCAR_DECODE=torch), same model and prompts; a radix hit vs the
    cold miss of the same prompt (identical tokens expected with page-consistent prefill);
  * capacity-bound decode (8B): as many unique 8k-token requests as each pool holds, sent at once;
    steady decode throughput and TPOT once all have started; 32k context at concurrency 1;
  * multi-turn chat load (bench/serving.py's driver): shared system prompt, growing histories;
  * one decode step's time split: the oscar backend's attention (all layers, in this process, CUDA
    events) against the server's TPOT at the same batch and context.

Writes OUT/gpu_serving.json (+ .png).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import aiohttp
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import serving  # noqa: E402  (bench/serving.py: the multi-turn driver)
from sglang_oscar import serve as serve_mod  # noqa: E402
from sglang_oscar.serve import Server  # noqa: E402

SHAPES = {
    "llama3-8b-shape": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                            max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "smollm2-135m-shape": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, head_dim=64, vocab_size=49152, rope_theta=100000.0,
                               max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5),
}
GPU_FLAGS = ["--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
             "--skip-server-warmup"]
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ---- random-weight checkpoints ---------------------------------------------------------------------
def make_checkpoint(path, shape: dict, tok_dir, device, final_norm=1.0, layers=None, seed=0):
    """A HF Llama directory with random bf16 weights (std 0.02), written in shards of a few layers."""
    import torch
    from safetensors.torch import save_file

    shape = dict(shape)
    if layers:
        shape["num_hidden_layers"] = layers
    os.makedirs(path, exist_ok=True)
    h, f, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    hq, hk, d, V = shape["num_attention_heads"], shape["num_key_value_heads"], shape["head_dim"], shape["vocab_size"]
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", torch_dtype="bfloat16",
               attention_bias=False, mlp_bias=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
               initializer_range=0.02, **shape)
    gen = torch.Generator(device=device).manual_seed(seed)

    def rnd(*s):
        return (torch.randn(*s, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()

    index, shard, n_shard = {}, {}, 0

    def flush():
        nonlocal shard, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, n_shard = {}, n_shard + 1

    ones = torch.ones(h, dtype=torch.bfloat16)
    shard["model.embed_tokens.weight"] = rnd(V, h)
    for i in range(L):
        p = f"model.layers.{i}."
        shard.update({p + "self_attn.q_proj.weight": rnd(hq * d, h), p + "self_attn.k_proj.weight": rnd(hk * d, h),
                      p + "self_attn.v_proj.weight": rnd(hk * d, h), p + "self_attn.o_proj.weight": rnd(h, hq * d),
                      p + "mlp.gate_proj.weight": rnd(f, h), p + "mlp.up_proj.weight": rnd(f, h),
                      p + "mlp.down_proj.weight": rnd(h, f), p + "input_layernorm.weight": ones.clone(),
                      p + "post_attention_layernorm.weight": ones.clone()})
        if (i + 1) % 4 == 0:
            flush()
    shard["model.norm.weight"] = ones * final_norm
    if not shape["tie_word_embeddings"]:
        shard["lm_head.weight"] = rnd(V, h)
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": index}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), path)
    return path


# ---- servers -----------------------------------------------------------------------------------
def server_flags(method, model, budget_gb, max_running, dry):
    args = ["--model-path", model, "--oscar-kv-budget-gb", str(budget_gb), "--enable-cache-report",
            "--max-running-requests", str(max_running), "--load-snapshot-publish-interval", "1"]
    if method == "bf16":
        args += ["--oscar-method", "bf16"] + ([] if dry else ["--attention-backend", "triton"])
    else:
        args += ["--oscar-method", "oscar", "--oscar-bits", method.split("-")[1]]
    return args + ([] if dry else GPU_FLAGS + ["--mem-fraction-static", "0.5"])


def start_all(specs, log_dir, timeout):
    """Start every server at once; returns {name: Server or the error}.

    The processes are created from this (main) thread: Server asks the kernel to SIGTERM a server
    when the thread that created it exits (PR_SET_PDEATHSIG follows the thread, not the process).
    """
    servers, out = {}, {}
    for name, args, env in specs:
        s = Server(args, env=env, log_path=os.path.join(log_dir, f"{name}.log"), timeout=timeout)
        s.proc = subprocess.Popen(s.args, env=s.env, stdout=open(s.log_path, "w"), stderr=subprocess.STDOUT,
                                  start_new_session=True, preexec_fn=serve_mod._die_with_parent)
        servers[name] = s
        time.sleep(2)  # stagger the imports a little
    deadline = time.time() + timeout
    while len(out) < len(servers) and time.time() < deadline:
        for name, s in servers.items():
            if name in out:
                continue
            if s.proc.poll() is not None:
                out[name] = RuntimeError(f"exited with {s.proc.returncode} during start-up")
                continue
            try:
                if requests.get(s.url + "/health", timeout=5).status_code == 200:
                    out[name] = s
                    log(f"server {name} up")
            except requests.RequestException:
                pass
        time.sleep(1)
    for name, s in servers.items():
        if name not in out:
            out[name] = TimeoutError(f"not healthy after {timeout:.0f}s")
        if not isinstance(out[name], Server):
            s.stop()
    return out


def stop_all(servers):
    """SIGTERM every server first, then wait: a slow shutdown must not add up."""
    live = [s for s in servers if s.proc and s.proc.poll() is None]
    for s in live:
        try:
            os.killpg(s.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + 20
    for s in live:
        try:
            s.proc.wait(max(0.1, end - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(s.proc.pid, signal.SIGKILL)


def server_info(url):
    return requests.get(url + "/server_info", timeout=60).json()


def total_tokens(url):
    return serving.find_num(server_info(url), "max_total_num_tokens")


# ---- request drivers -------------------------------------------------------------------------------
async def gen_stream(session, url, ids, max_new):
    """One streamed /generate: token arrival times, output ids, cached tokens."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}
    t0 = time.perf_counter()
    times, n_prev, meta = [], 0, {}
    async with session.post(url + "/generate", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {(await r.text())[:200]}")
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            meta = chunk.get("meta_info", {})
            n = meta.get("completion_tokens", n_prev + 1)
            now = time.perf_counter()
            times += [now] * (n - n_prev)
            n_prev = n
    if n_prev != max_new:
        raise RuntimeError(f"{n_prev} of {max_new} tokens")
    return {"t0": t0, "times": times, "cached": meta.get("cached_tokens", 0)}


async def long_ctx_run(url, n, ctx, max_new, seed, timeout_s=1800):
    """n unique ctx-token prompts at once. Steady decode = the window in which all n are decoding."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1000, 40000) for _ in range(ctx)] for _ in range(n)]
    samples, stop = [], asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s),
                                     connector=aiohttp.TCPConnector(limit=n + 4)) as session:
        poller = asyncio.create_task(serving.poll_loads(session, url, samples, stop))
        t0 = time.perf_counter()
        res = await asyncio.gather(*[gen_stream(session, url, p, max_new) for p in prompts], return_exceptions=True)
        wall = time.perf_counter() - t0
        stop.set()
        await poller
    ok = [r for r in res if isinstance(r, dict)]
    errors = [repr(r)[:200] for r in res if not isinstance(r, dict)]
    row = {"ctx": ctx, "concurrency": n, "max_new_tokens": max_new, "wall_s": wall, "errors": len(errors),
           "error_samples": errors[:3], "peak_running_reqs": max((s["num_running_reqs"] or 0 for s in samples),
                                                                default=None)}
    if ok:
        start = max(r["times"][0] for r in ok)     # every request has its first token
        end = min(r["times"][-1] for r in ok)      # none has finished
        toks = sum(sum(1 for t in r["times"] if start < t <= end) for r in ok)
        gaps = sorted(b - a for r in ok for a, b in zip(r["times"], r["times"][1:]) if a >= start and b <= end)
        all_gaps = sorted(b - a for r in ok for a, b in zip(r["times"], r["times"][1:]))
        row.update(out_tok_per_s=sum(len(r["times"]) for r in ok) / wall,
                   decode_tok_per_s=toks / (end - start) if end > start else None,
                   tpot_p50_ms=serving.pct(gaps or all_gaps, 50) * 1000 if (gaps or all_gaps) else None,
                   steady_window_s=max(0.0, end - start),
                   ttft_p50_ms=serving.pct([r["times"][0] - r["t0"] for r in ok], 50) * 1000)
    return row


def greedy(url, prompts, max_new):
    outs = []
    for ids in prompts:
        r = requests.post(url + "/generate", json={"input_ids": ids, "return_logprob": True, "sampling_params": {
            "max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}, timeout=600)
        r.raise_for_status()
        j = r.json()
        lp = [t[0] for t in j["meta_info"].get("output_token_logprobs") or []]
        outs.append({"ids": j["output_ids"], "cached": j["meta_info"].get("cached_tokens", 0), "logprobs": lp})
    return outs


def logprob_gap(a, b):
    """Largest |logprob difference| of the chosen token over the common greedy prefix of each pair."""
    worst = 0.0
    for x, y in zip(a, b):
        for i, (p, q) in enumerate(zip(x["ids"], y["ids"])):
            if p != q:
                break
            if i < len(x["logprobs"]) and i < len(y["logprobs"]):
                worst = max(worst, abs(x["logprobs"][i] - y["logprobs"][i]))
    return worst


def agreement(a, b):
    """Exact-match fraction and mean common-prefix fraction of two lists of token lists."""
    exact = sum(x == y for x, y in zip(a, b)) / len(a)
    pref = []
    for x, y in zip(a, b):
        k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        pref.append(k / max(1, len(x)))
    return {"exact": exact, "prefix": sum(pref) / len(pref), "n": len(a)}


# ---- decode-step split (in process) ----------------------------------------------------------------
def attention_step_ms(shape, B, ctx, P=64, bits=2, iters=10):
    """The oscar backend's decode attention for one step over all layers: plan + per layer (residual
    write, store, decode kernel), on a pool of random packed pages. CUDA events around the step."""
    import types

    import torch

    from randpool import random_pool
    from sglang_oscar.backend import OscarAttnBackend
    from sglang_oscar.config import OscarConfig

    dev = "cuda"
    Hq, H, D, L = (shape[k] for k in ("num_attention_heads", "num_key_value_heads", "head_dim",
                                      "num_hidden_layers"))
    cfg = OscarConfig(method="oscar", bits=bits, page_size=P)
    pages_per = -(-(ctx + iters + 2) // P)
    n_pages = B * pages_per + 1
    pages, res_k, res_v = [], [], []
    for _ in range(L):
        pages.append(random_pool(n_pages, P, H, D, bits, dev))
        res_k.append(torch.randn(B + 1, P, H, D, device=dev, dtype=torch.bfloat16))
        res_v.append(torch.randn(B + 1, P, H, D, device=dev, dtype=torch.bfloat16))
    req_to_token = torch.zeros((B + 1, pages_per * P), dtype=torch.int32, device=dev)
    perm = torch.randperm(n_pages - 1)[: B * pages_per] + 1
    for b in range(B):
        pg = perm[b * pages_per:(b + 1) * pages_per]
        req_to_token[b + 1] = (pg[:, None] * P + torch.arange(P)[None, :]).flatten().to(torch.int32).to(dev)
    pool = types.SimpleNamespace(layer=lambda i: (pages[i], res_k[i], res_v[i]))
    be = OscarAttnBackend.detached(cfg, pool, req_to_token, dev, use_kernels=True)
    layers = [types.SimpleNamespace(tp_q_head_num=Hq, tp_k_head_num=H, qk_head_dim=D, layer_id=i, scaling=D ** -0.5,
                                    is_cross_attention=False, logit_cap=0, sliding_window_size=-1) for i in range(L)]
    q = torch.randn(B, Hq * D, device=dev, dtype=torch.bfloat16)
    k = torch.randn(B, H * D, device=dev, dtype=torch.bfloat16)
    rows = torch.arange(1, B + 1, device=dev)
    times = []
    for it in range(iters + 3):
        s = ctx + it
        fb = types.SimpleNamespace(req_pool_indices=rows, seq_lens=torch.full((B,), s, device=dev),
                                   seq_lens_cpu=torch.full((B,), s), forward_mode=types.SimpleNamespace(
                                       is_decode=lambda: True), extend_seq_lens_cpu=None)
        torch.cuda.synchronize()
        a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        h0 = time.perf_counter()
        a.record()
        be.init_forward_metadata(fb)
        for layer in layers:
            be.forward_decode(q, k, k, layer, fb)
        e.record()
        host = time.perf_counter() - h0
        torch.cuda.synchronize()
        if it >= 3:
            times.append((a.elapsed_time(e), host * 1000))
    times.sort()
    gpu_ms, host_ms = times[len(times) // 2]
    return {"B": B, "ctx": ctx, "layers": L, "attention_ms": gpu_ms, "attention_host_ms": host_ms}


# ---- phases ----------------------------------------------------------------------------------------
class Run:
    def __init__(self, a):
        self.a = a
        self.res = {"capacity": {}, "throughput_ratio": None, "rows": [], "hardware": serving.hardware(),
                    "notes": [], "phases": {}}
        self.deadline = T0 + a.deadline_s

    def left(self):
        return self.deadline - time.time()

    def save(self):
        with open(os.path.join(self.a.out, "gpu_serving.json"), "w") as f:
            json.dump(self.res, f, indent=1, default=str)

    def phase(self, name, fn, need_s=0):
        if name in self.a.skip.split(","):
            self.res["phases"][name] = "skipped (--skip)"
            return None
        if self.left() < need_s:
            log(f"SKIP {name}: {self.left():.0f}s left < {need_s}s")
            self.res["phases"][name] = "skipped (time)"
            return None
        t = time.time()
        log(f"phase {name}")
        try:
            out = fn()
            self.res["phases"][name] = f"ok {time.time() - t:.0f}s"
            return out
        except Exception as e:  # noqa: BLE001 - one phase failing must not lose the others
            traceback.print_exc()
            self.res["phases"][name] = f"failed after {time.time() - t:.0f}s: {e!r}"[:500]
            return None
        finally:
            self.save()


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True, help="a HF tokenizer dir (with chat template) for the random models")
    ap.add_argument("--work", default=None, help="checkpoints and logs (default: a temp dir in RAM if there is one)")
    ap.add_argument("--servers", default=None, help="start only these (comma list of names)")
    ap.add_argument("--skip", default="", help="phases to skip (comma list)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models: checks this script's logic")
    ap.add_argument("--deadline-s", type=float, default=540)
    ap.add_argument("--big-budget-gb", type=float, default=8.0, help="KV budget of each 8B-shape server")
    ap.add_argument("--small-budget-gb", type=float, default=2.0, help="KV budget of each 135M-shape server")
    ap.add_argument("--max-running", type=int, default=64)
    ap.add_argument("--big-layers", type=int, default=None, help="fewer layers for the 8B shape (stated in the output)")
    ap.add_argument("--long-ctx", type=int, default=8192)
    ap.add_argument("--long-new", type=int, default=128)
    ap.add_argument("--longest-ctx", type=int, default=32768)
    ap.add_argument("--chat-levels", default="8,32")
    ap.add_argument("--chat-tokens", type=int, default=64)
    a = ap.parse_args()
    a.out, a.tokenizer = os.path.abspath(a.out), os.path.abspath(a.tokenizer)  # the run chdirs below
    os.makedirs(a.out, exist_ok=True)
    # 16 GB of random weights: written to RAM (tmpfs) when there is one, a disk may take minutes.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 40e9 else None
    work = a.work or tempfile.mkdtemp(prefix="gpu_serving_", dir=shm)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    run = Run(a)
    R = run.res
    dev = "cpu" if a.dry_run else "cuda"
    big, small = "llama3-8b-shape", "smollm2-135m-shape"
    shapes = {k: dict(v) for k, v in SHAPES.items()}
    if a.dry_run:  # tiny: 2 layers, short contexts
        shapes[big].update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=49152)
        shapes[small].update(num_hidden_layers=2)
        a.long_ctx, a.long_new, a.longest_ctx, a.chat_levels, a.chat_tokens = 300, 8, 600, "2", 4
        a.big_budget_gb, a.small_budget_gb = 0.1, 0.05
    if a.big_layers:
        shapes[big]["num_hidden_layers"] = a.big_layers
    R["setup"] = {"shapes": shapes, "kv_budget_gb": {big: a.big_budget_gb, small: a.small_budget_gb},
                  "max_running_requests": a.max_running, "server_flags": GPU_FLAGS, "dry_run": a.dry_run}
    if a.big_layers:
        R["notes"].append(f"8B shape with {a.big_layers} layers instead of 32")
    R["notes"] += [
        "random weights of real shapes; all servers: SGLang 0.5.23 from the bundle, no CUDA graphs, torch "
        f"sampling, unfused torch norms/RoPE (bundle shim), --max-running-requests {a.max_running}, the same "
        "--oscar-kv-budget-gb per model",
        "oscar backend on CUDA: decode and prefill (extend) run the CUDA kernels (plan once per batch; extend = "
        "one decode-kernel query per token over its earlier packed pages plus its own raw page); the "
        "small-oscar-2-torch server runs the backend's torch path for both (SGLANG_OSCAR_DECODE=torch)",
        "out_tok_per_s of the capacity-bound rows counts the whole wall time, prefill included; "
        "decode_tok_per_s is the steady window in which every request is decoding (throughput_ratio uses it)"]
    # Servers start in a directory of their own, so they import the installed package, not this checkout.
    os.chdir(work)

    # Checkpoints (the 8B one on the GPU's random generator: seconds; the disk write dominates).
    ckpt = {}
    ckpt[small] = run.phase("ckpt-135m", lambda: make_checkpoint(os.path.join(work, small), shapes[small],
                                                                  a.tokenizer, dev, final_norm=4.0))
    ckpt[big] = run.phase("ckpt-8b", lambda: make_checkpoint(os.path.join(work, big), shapes[big], a.tokenizer, dev))
    if not ckpt[small] or not ckpt[big]:
        return finish(run, work)
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    logs = os.path.join(work, "logs")
    specs = [
        ("big-bf16", server_flags("bf16", ckpt[big], a.big_budget_gb, a.max_running, a.dry_run), {}),
        ("big-oscar-2", server_flags("oscar-2", ckpt[big], a.big_budget_gb, a.max_running, a.dry_run), {}),
        ("small-bf16", server_flags("bf16", ckpt[small], a.small_budget_gb, a.max_running, a.dry_run), {}),
        ("small-oscar-2", server_flags("oscar-2", ckpt[small], a.small_budget_gb, a.max_running, a.dry_run), {}),
        ("small-oscar-2-torch", server_flags("oscar-2", ckpt[small], a.small_budget_gb, a.max_running, a.dry_run),
         {"SGLANG_OSCAR_DECODE": "torch"}),
    ]
    if a.servers:
        specs = [sp for sp in specs if sp[0] in a.servers.split(",")]
    t = time.time()
    srv = run.phase("start-servers", lambda: start_all(specs, logs, timeout=max(60, min(400, run.left() - 120))))
    if srv is None:
        return finish(run, work)
    R["startup_s"] = time.time() - t
    for name, s in srv.items():
        log(f"server {name}: {'up ' + s.url if isinstance(s, Server) else 'FAILED ' + repr(s)}")
    up = {n: s.url for n, s in srv.items() if isinstance(s, Server)}
    R["servers_up"] = sorted(up)
    if not any("oscar" in n for n in up):
        # Nothing to compare: keep the device time, report the failure (servers.log has the reason).
        R["notes"].append("no oscar server came up; load phases skipped")
        up = {n: u for n, u in up.items() if n == "big-bf16"}
        run.deadline = min(run.deadline, time.time() + 30)
    try:
        body(run, a, up, shapes, big, small)
    finally:
        stop_all([s for s in srv.values() if isinstance(s, Server)])
        finish(run, work)


def body(run, a, up, shapes, big, small):
    R = run.res

    # capacity
    def capacity():
        cap = {}
        for name in ("big-bf16", "big-oscar-2", "small-bf16", "small-oscar-2"):
            if name in up:
                cap[name] = total_tokens(up[name])
        b, o = cap.get("big-bf16"), cap.get("big-oscar-2")
        R["capacity"] = {"bf16_tokens": b, "oscar_tokens": o, "ratio": (o / b) if b and o else None,
                         "model": big, "kv_budget_gb": a.big_budget_gb,
                         "per_server": cap,
                         "max_concurrent_32k": {"bf16": b // (32768 + 64) if b else None,
                                                "oscar-2": min(a.max_running, o // (32768 + 64)) if o else None,
                                                "oscar-2_uncapped": o // (32768 + 64) if o else None}}
        log(f"capacity {R['capacity']}")
    run.phase("capacity", capacity)

    # correctness: kernels vs torch path, hit vs miss (135M shape)
    def correctness():
        import threading
        rng = random.Random(1)
        prompts = [[rng.randrange(1000, 40000) for _ in range(n)] for n in (17, 63, 64, 65, 200, 700, 1500, 3000)]
        n_new = 32 if not a.dry_run else 8
        out = {}

        def one(name):  # cold (miss) then the same prompts again (radix hit)
            requests.post(up[name] + "/flush_cache", timeout=60)
            out[name] = {"miss": greedy(up[name], prompts, n_new), "hit": greedy(up[name], prompts, n_new)}
        ts = [threading.Thread(target=one, args=(n,)) for n in ("small-oscar-2", "small-oscar-2-torch", "small-bf16")
              if n in up]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        ids = {n: {k: [x["ids"] for x in o[k]] for k in o} for n, o in out.items()}
        c = {"prompt_lens": [len(p) for p in prompts], "new_tokens": n_new}
        if "small-oscar-2" in out and "small-oscar-2-torch" in out:
            c["kernels_vs_torch_path"] = agreement(ids["small-oscar-2"]["miss"], ids["small-oscar-2-torch"]["miss"])
            c["kernels_vs_torch_path"]["max_logprob_gap_common_prefix"] = logprob_gap(
                out["small-oscar-2"]["miss"], out["small-oscar-2-torch"]["miss"])
        for name, o in out.items():
            c[f"{name}_hit_vs_miss"] = agreement(ids[name]["hit"], ids[name]["miss"])
            c[f"{name}_hit_vs_miss"]["max_logprob_gap_common_prefix"] = logprob_gap(o["hit"], o["miss"])
            c[f"{name}_cached_tokens_on_hit"] = [x["cached"] for x in o["hit"]]
            c[f"{name}_cached_tokens_on_miss"] = [x["cached"] for x in o["miss"]]
        if "small-oscar-2" in out and "small-bf16" in out:
            c["oscar2_vs_bf16"] = agreement(ids["small-oscar-2"]["miss"], ids["small-bf16"]["miss"])
        R["correctness"] = c
        log(f"correctness {json.dumps({k: v for k, v in c.items() if 'vs' in k})}")
    run.phase("correctness", correctness, need_s=30)

    def add_row(method, model, row):
        row = {"method": method, "model": model, **row}
        R["rows"].append(row)
        log(f"{method:8s} {model} c={row.get('concurrency')} ctx={row.get('ctx')} "
            f"out {row.get('out_tok_per_s') or 0:.1f} tok/s decode {row.get('decode_tok_per_s') or 0:.1f} tok/s "
            f"TPOT p50 {row.get('tpot_p50_ms') or 0:.1f} ms err {row.get('errors')}")

    # multi-turn chat (bench/serving.py's driver)
    def chat(prefix, model):
        for c in [int(x) for x in a.chat_levels.split(",")]:
            for method in ("bf16", "oscar-2"):
                name = f"{prefix}-{method}"
                if name not in up or run.left() < 40:
                    continue
                row = asyncio.run(serving.run_level(up[name], c, c, (2, 3), a.chat_tokens, seed=c,
                                                    desc=f"{name} c={c}"))
                row.update(ctx="chat", kind="multi-turn chat (shared system prompt, growing histories)")
                add_row(method, model, row)
    run.phase("chat-8b", lambda: chat("big", big), need_s=60)

    # capacity-bound decode at 8k: as many unique requests as each pool holds
    def capacity_bound():
        for method in ("bf16", "oscar-2"):
            name = f"big-{method}"
            if name not in up:
                continue
            tot = total_tokens(up[name])
            # 5% margin: SGLang reserves decode room per running request; one queued request
            # would end the steady window (all decoding) before it starts.
            n = max(1, min(a.max_running, int(tot * 0.95) // (a.long_ctx + a.long_new + 64)))
            requests.post(up[name] + "/flush_cache", timeout=60)
            row = asyncio.run(long_ctx_run(up[name], n, a.long_ctx, a.long_new, seed=3,
                                           timeout_s=max(30, run.left() - 60)))
            row["kind"] = "capacity-bound (unique prompts, as many as the pool holds)"
            add_row(method, big, row)
        rows = [r for r in R["rows"] if r.get("kind", "").startswith("capacity") and r["ctx"] == a.long_ctx]
        by = {r["method"]: r for r in rows}
        if "bf16" in by and "oscar-2" in by and by["bf16"].get("decode_tok_per_s") and by["oscar-2"].get(
                "decode_tok_per_s"):
            R["throughput_ratio"] = by["oscar-2"]["decode_tok_per_s"] / by["bf16"]["decode_tok_per_s"]
            R["throughput_ratio_basis"] = (f"steady decode tok/s, {big}, {a.long_ctx}-token unique prompts, "
                                           f"as many at once as each pool holds")
    run.phase("capacity-bound-8k", capacity_bound, need_s=120)


    # longest context at concurrency 1
    def longest():
        for method in ("bf16", "oscar-2"):
            name = f"big-{method}"
            if name in up and run.left() > 45:
                row = asyncio.run(long_ctx_run(up[name], 1, a.longest_ctx, 64, seed=5,
                                               timeout_s=max(30, run.left() - 25)))
                row["kind"] = "one long request"
                add_row(method, big, row)
    run.phase("longest-ctx", longest, need_s=60)

    run.phase("chat-135m", lambda: chat("small", small), need_s=40)

    # decode-step split: attention (in process) vs the server's TPOT at the same batch and context
    def split():
        if a.dry_run:
            return
        rows = [r for r in R["rows"] if r["method"] == "oscar-2" and r["model"] == big and r.get("kind", "").startswith(
            ("capacity", "one long")) and r.get("tpot_p50_ms")]
        out = []
        for r in rows:
            t = attention_step_ms(shapes[big], r["concurrency"], r["ctx"])
            t.update(server_tpot_ms=r["tpot_p50_ms"], attention_share=t["attention_ms"] / r["tpot_p50_ms"])
            out.append(t)
            log(f"split B={t['B']} ctx={t['ctx']}: attention {t['attention_ms']:.2f} ms (host {t['attention_host_ms']:.2f})"
                f" of TPOT {r['tpot_p50_ms']:.2f} ms")
        R["decode_step_split"] = {"method": "oscar backend decode (plan + per layer residual write, page store, "
                                            "decode kernel) over all layers timed in-process with CUDA events; "
                                            "rest = server TPOT p50 minus that", "runs": out}
    run.phase("step-split", split, need_s=20)


def finish(run, work):
    R = run.res
    R["wall_s"] = time.time() - T0
    run.save()
    # Server logs: one file, the tail of each (only a few files come back from a run).
    with open(os.path.join(run.a.out, "servers.log"), "w") as out:
        d = os.path.join(work, "logs")
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            with open(os.path.join(d, name), errors="replace") as f:
                lines = f.readlines()
            out.write(f"===== {name} ({len(lines)} lines, last 150) =====\n")
            out.writelines(lines[-150:])
    try:
        plot(R, os.path.join(run.a.out, "gpu_serving.png"))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    table(R)


def plot(R, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    cap = R.get("capacity") or {}
    if cap.get("bf16_tokens"):
        axes[0].bar(["bf16", "oscar-2"], [cap["bf16_tokens"], cap["oscar_tokens"] or 0], color=["tab:gray", "tab:blue"])
        axes[0].set_title(f"KV capacity (tokens) at {cap.get('kv_budget_gb')} GiB, x{cap.get('ratio') or 0:.2f}",
                          fontsize=9)
    rows = [r for r in R["rows"] if r.get("out_tok_per_s")]
    size = {"llama3-8b-shape": "8B", "smollm2-135m-shape": "135M"}
    labels = [f"{r['method']} {size.get(r['model'], r['model'])} c={r['concurrency']} {r['ctx']}" for r in rows]
    xs = range(len(rows))
    axes[1].bar(xs, [r.get("decode_tok_per_s") or r["out_tok_per_s"] for r in rows],
                color=["tab:gray" if r["method"] == "bf16" else "tab:blue" for r in rows])
    axes[1].set_title("decode tok/s (steady; chat rows: out tok/s)", fontsize=9)
    axes[2].bar(xs, [r.get("tpot_p50_ms") or 0 for r in rows],
                color=["tab:gray" if r["method"] == "bf16" else "tab:blue" for r in rows])
    axes[2].set_title("TPOT p50 (ms)", fontsize=9)
    for ax in axes[1:]:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
    fig.suptitle(f"SGLang 0.5.23 + sglang_oscar on {R.get('hardware')} (random weights, real shapes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(R):
    print("\n== gpu_serving summary ==")
    print("phases:", json.dumps(R.get("phases")))
    print("capacity:", json.dumps(R.get("capacity")))
    print("correctness:", json.dumps({k: v for k, v in (R.get("correctness") or {}).items() if "vs" in k or "hit" in k},
                                     default=str)[:1500])
    print(f"{'method':8s} {'model':20s} {'c':>4s} {'ctx':>6s} {'out tok/s':>10s} {'dec tok/s':>10s} {'TPOT ms':>8s} err")
    for r in R["rows"]:
        print(f"{r['method']:8s} {r['model']:20s} {r['concurrency']:4d} {str(r['ctx']):>6s} "
              f"{r.get('out_tok_per_s') or 0:10.1f} {r.get('decode_tok_per_s') or 0:10.1f} "
              f"{r.get('tpot_p50_ms') or 0:8.2f} {r.get('errors')}")
    print("throughput_ratio:", R.get("throughput_ratio"))
    for s in (R.get("decode_step_split") or {}).get("runs", []):
        print(f"split: {s}")


if __name__ == "__main__":
    main()
