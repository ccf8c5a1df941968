"""bf16 SGLang vs oscar-2 as users run them, on one CUDA GPU, in one run.

    python bench/gpu_serving.py --out DIR --tokenizer TOKDIR     # (bench/gpu_serving.sh sets the machine up)
    python bench/gpu_serving.py --dry-run --out DIR --tokenizer TOKDIR   # CPU, tiny model: checks the driver

Model: random weights of Llama-3.1-8B's shape (32 layers, 32 q / 8 kv heads, d=128, vocab 128256): no
weights can be downloaded where this runs. Two servers of it, started at once and measured one after
the other (never both under load):
  * bf16: SGLang's own configuration for the model (decode CUDA graphs on, page 1, its scheduler
    defaults) with the attention backend noted in the JSON;
  * oscar-2: the same flags plus --oscar-method oscar --oscar-bits 2 (the launcher adds what OScaR needs).
Both get the same fixed KV budget (--oscar-kv-budget-gb) and --max-running-requests; this script passes
no flag that turns decode CUDA graphs off on either side.

Measured:
  * capacity: max_total_num_tokens of each pool at the same budget;
  * capacity-bound decode: as many unique 8k-token requests as each pool holds, sent at once (this
    script's streaming client): steady decode tok/s while all of them decode together;
  * SGLang's own client, `python -m sglang.bench_serving` (bench/bench_serving_runs.py runs its entry
    point once per setting in one process): one 32k-token prompt at a time (random-ids dataset, token
    ids sent as ids) for TTFT/TPOT, and a concurrency sweep of its generated-shared-prefix dataset
    (multi-turn chats over a few shared system prompts, chat API) for throughput, TTFT and TPOT.

Writes OUT/gpu_serving.json, OUT/gpu_serving.png, OUT/summary.txt, OUT/servers.log, OUT/bench_serving.log.
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
import serving  # noqa: E402  (bench/serving.py: load polling and percentiles)
from sglang_oscar import serve as serve_mod  # noqa: E402
from sglang_oscar.serve import Server  # noqa: E402

SHAPE = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
             num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
             max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5)
MODEL = "llama3.1-8b-shape"
METHODS = ("bf16", "oscar-2")
# The SGLang bundle of the GPU machine stubs sgl-kernel: prefill CUDA graphs and FlashInfer's sampler
# need it, so both servers run without them; SGLang's own warm-up is replaced by ours (see warm()).
GPU_FLAGS = ["--cuda-graph-backend-prefill", "disabled", "--sampling-backend", "pytorch", "--skip-server-warmup"]
# SGLang's Hopper default attention backend (fa3) lives in sgl-kernel; triton is the fastest that runs here.
BF16_GPU_BACKEND = "triton"
INFO_KEYS = {"attention_backend", "decode_attention_backend", "prefill_attention_backend", "page_size",
             "max_running_requests", "max_total_num_tokens", "sampling_backend", "mem_fraction_static",
             "chunked_prefill_size", "kv_cache_dtype", "disable_radix_cache", "schedule_policy", "device", "dtype",
             "tp_size", "context_length", "disable_cuda_graph", "disable_decode_cuda_graph",
             "oscar"}   # the quantization config the server reports (method, bits, page, prefill mode)
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ---- random-weight checkpoint -----------------------------------------------------------------------
def make_checkpoint(path, shape: dict, tok_dir, device, seed=0):
    """A HF Llama directory with random bf16 weights (std 0.02), written in shards of a few layers."""
    import torch
    from safetensors.torch import save_file

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
    shard["model.norm.weight"] = ones
    if not shape["tie_word_embeddings"]:
        shard["lm_head.weight"] = rnd(V, h)
    flush()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": index}, fh)
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=1)
    for name in os.listdir(tok_dir):   # the tokenizer's files only: its config.json is another model's
        if name != "config.json" and not name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(os.path.join(tok_dir, name), path)
    return path


# ---- servers -----------------------------------------------------------------------------------
def server_flags(method, model, a):
    """Identical flags for both methods but the method itself (and bf16's attention backend on CUDA)."""
    args = ["--model-path", model, "--oscar-kv-budget-gb", str(a.budget_gb),
            "--max-running-requests", str(a.max_running),
            "--enable-cache-report",                      # cached_tokens in the OpenAI usage (--cache-report)
            "--load-snapshot-publish-interval", "1",      # /v1/loads current after every step (running count)
            "--nccl-port", str(serve_mod.free_port())]    # servers starting together must not race for one
    if not a.dry_run:
        # Two servers share the GPU: each may claim at most this fraction (weights + fixed KV budget fit).
        args += GPU_FLAGS + ["--mem-fraction-static", str(a.mem_fraction)]
    if method == "bf16":
        return args + ["--oscar-method", "bf16"] + ([] if a.dry_run else ["--attention-backend", BF16_GPU_BACKEND])
    return args + ["--oscar-method", "oscar", "--oscar-bits", method.split("-")[1]]


def start_all(specs, log_dir, timeout):
    """Start every server at once (specs: (name, argv[, env])); returns {name: Server or the error}.

    The processes are created from this (main) thread: Server asks the kernel to SIGTERM a server
    when the thread that created it exits (PR_SET_PDEATHSIG follows the thread, not the process).
    """
    servers, out = {}, {}
    for name, args, *env in specs:   # (name, argv) or (name, argv, extra environment)
        s = Server(args, env=env[0] if env else None, log_path=os.path.join(log_dir, f"{name}.log"), timeout=timeout)
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


def effective_settings(info):
    """The settings a server actually runs with (after SGLang's and the launcher's defaults)."""
    out = {}

    def walk(d):
        for k, v in d.items():
            if k in out:
                continue
            if k in INFO_KEYS or k.startswith("cuda_graph"):
                out[k] = v
            elif isinstance(v, dict):
                walk(v)
    walk(info)
    return dict(sorted(out.items()))


def hardware():
    """nvidia-smi's name of GPU 0 (with memory and driver), else this script's CPU description."""
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        if q.returncode == 0 and q.stdout.strip():
            name, mem, drv = [x.strip() for x in q.stdout.strip().splitlines()[0].split(",")]
            return {"name": name, "memory_total": mem, "driver": drv, "source": "nvidia-smi"}
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    return {"name": serving.hardware(), "source": "cpu"}


# ---- this script's own client: capacity-bound decode -------------------------------------------
async def gen_stream(session, url, ids, max_new):
    """One streamed /generate: token arrival times and cached tokens."""
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


# ---- SGLang's own client -------------------------------------------------------------------------
def bench_serving_plan(a, up, model, outdir):
    """The bench_serving runs, in order: the 32k prompt on each server, then the sweep level by level
    (bf16 then oscar-2 at each level, so a run cut short by the deadline loses the top levels of both)."""
    runs = []

    def common(name, url):
        return ["--base-url", url, "--model", model, "--tokenizer", model, "--disable-tqdm", "--seed", "1",
                "--flush-cache", "--output-file", os.path.join(outdir, f"{name}.jsonl")]

    for m in METHODS:
        if m in up:
            name = f"long-{m}"
            # Token ids sent as ids: the prompt is exactly long_ctx tokens. The servers are warm, so no
            # warm-up request (it would be one more full long prefill).
            runs.append({"name": name, "method": m, "kind": "long", "need_s": a.need_long_s, "argv": [
                "--backend", "sglang", "--dataset-name", "random-ids", "--tokenize-prompt",
                "--random-input-len", str(a.longest_ctx), "--random-output-len", str(a.longest_new),
                "--random-range-ratio", "1", "--num-prompts", str(a.longest_prompts), "--max-concurrency", "1",
                "--warmup-requests", "0", *common(name, up[m])]})
    levels = [int(x) for x in a.levels.split(",")]
    convs = [int(x) for x in a.convs.split(",")]
    if len(convs) != len(levels) or any(n % a.gsp_groups for n in convs):
        raise SystemExit(f"--convs {a.convs} must give one count per level, each a multiple of "
                         f"--gsp-groups {a.gsp_groups}")
    for i, (c, n) in enumerate(zip(levels, convs)):
        for m in METHODS:
            if m in up:
                name = f"gsp-{m}-c{c}"
                runs.append({"name": name, "method": m, "kind": "gsp", "concurrency": c, "conversations": n,
                             "need_s": a.need_level_s * max(1.0, c / 64), "argv": [
                                 "--backend", "sglang-oai-chat", "--dataset-name", "generated-shared-prefix",
                                 "--gsp-num-groups", str(a.gsp_groups),
                                 "--gsp-prompts-per-group", str(n // a.gsp_groups),
                                 "--gsp-system-prompt-len", str(a.gsp_system_len),
                                 "--gsp-question-len", str(a.gsp_question_len),
                                 "--gsp-output-len", str(a.gsp_output_len), "--gsp-num-turns", str(a.gsp_turns),
                                 "--num-prompts", str(n), "--max-concurrency", str(c), "--cache-report",
                                 # one warm-up conversation at the first level (compiles what the chat path needs)
                                 "--warmup-requests", "1" if i == 0 else "0", *common(name, up[m])]})
    return runs


def run_bench_serving(run, a, up, model, work):
    outdir = os.path.join(work, "bench_serving")
    os.makedirs(outdir, exist_ok=True)
    runs = bench_serving_plan(a, up, model, outdir)
    deadline = run.deadline - 20  # room to stop the servers and write the results
    plan = os.path.join(outdir, "plan.json")
    with open(plan, "w") as f:
        json.dump({"deadline": deadline, "runs": runs}, f, indent=1)
    bs = run.res["bench_serving"] = {
        "client": "python -m sglang.bench_serving (sglang " + sglang_version() + "), one process for all runs "
                  "(bench/bench_serving_runs.py calls its entry point with each argv)",
        "runs": []}
    log_path = os.path.join(a.out, "bench_serving.log")
    with open(log_path, "a") as lf:
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "bench_serving_runs.py"), plan], stdout=lf,
                             stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=serve_mod._die_with_parent)
        cut = False
        try:
            p.wait(timeout=max(1.0, deadline - time.time() + 10))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            cut = True
            log("bench_serving runs cut at the deadline")
    status = {}
    if os.path.exists(plan + ".status.jsonl"):
        with open(plan + ".status.jsonl") as f:
            for line in f:
                s = json.loads(line)
                status[s["name"]] = s
    for r in runs:
        st = status.get(r["name"], {"status": "cut at the deadline" if cut else "not run"})
        cut = cut and r["name"] in status
        row = {k: r[k] for k in ("name", "method", "kind", "concurrency", "conversations") if k in r}
        row.update(argv=["python", "-m", "sglang.bench_serving", *r["argv"]], status=st["status"],
                   wall_s=st.get("wall_s"))
        out = os.path.join(outdir, f"{r['name']}.jsonl")
        if os.path.exists(out):
            with open(out) as f:
                lines = [json.loads(x) for x in f if x.strip()]
            if lines:
                res = lines[-1]
                res.pop("server_info", None)  # recorded once per server under "servers"
                row["result"] = res
        bs["runs"].append(row)
        res = row.get("result") or {}
        log(f"bench_serving {r['name']}: {row['status']}, out {res.get('output_throughput') or 0:.1f} tok/s, "
            f"TTFT p50 {res.get('median_ttft_ms') or 0:.1f} ms, TPOT p50 {res.get('median_tpot_ms') or 0:.2f} ms, "
            f"completed {res.get('completed')}")
    run.save()


def sglang_version():
    try:
        import importlib.metadata as md
        return md.version("sglang")
    except Exception:  # noqa: BLE001
        return "?"


# ---- phases ----------------------------------------------------------------------------------------
class Run:
    def __init__(self, a):
        self.a = a
        self.res = {"hardware": hardware(), "notes": [], "phases": {}, "servers": {}, "capacity": {},
                    "capacity_bound": [], "bench_serving": {}, "ratios": {}}
        self.deadline = T0 + a.deadline_s
        self.work = None

    def paths_out(self, text):
        """This machine's temp paths out of the results: $WORK (checkpoint, logs), $OUT."""
        for path, name in ((self.work, "$WORK"), (self.a.out, "$OUT"), (self.a.tokenizer, "$TOKENIZER")):
            if path:
                text = text.replace(path, name)
        return text

    def left(self):
        return self.deadline - time.time()

    def save(self):
        with open(os.path.join(self.a.out, "gpu_serving.json"), "w") as f:
            f.write(self.paths_out(json.dumps(self.res, indent=1, default=str)))

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
    ap.add_argument("--tokenizer", required=True, help="a HF tokenizer dir (with chat template) for the random model")
    ap.add_argument("--work", default=None, help="checkpoint and logs (default: a temp dir in RAM if there is one)")
    ap.add_argument("--skip", default="", help="phases to skip (comma list)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny model, two levels: checks the whole driver")
    ap.add_argument("--deadline-s", type=float, default=520, help="seconds from start for everything")
    ap.add_argument("--quiet-file", default=None,
                    help="wait (at most --quiet-wait-s) for this file before measuring: the caller creates it "
                         "once its own GPU work (tests) is done")
    ap.add_argument("--quiet-wait-s", type=float, default=90)
    ap.add_argument("--budget-gb", type=float, default=8.0, help="KV budget of each server")
    ap.add_argument("--max-running", type=int, default=128, help="--max-running-requests of each server")
    ap.add_argument("--mem-fraction", type=float, default=0.5, help="--mem-fraction-static of each (CUDA)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers than 32 (stated in the output)")
    ap.add_argument("--long-ctx", type=int, default=8192, help="capacity-bound phase: prompt tokens")
    ap.add_argument("--long-new", type=int, default=128)
    ap.add_argument("--longest-ctx", type=int, default=32768, help="bench_serving random-ids prompt tokens")
    ap.add_argument("--longest-new", type=int, default=64)
    ap.add_argument("--longest-prompts", type=int, default=2)
    ap.add_argument("--levels", default="1,8,32,128,256", help="bench_serving --max-concurrency sweep")
    ap.add_argument("--convs", default="4,16,64,256,256",
                    help="conversations per level (a multiple of --gsp-groups; each is --gsp-turns requests)")
    ap.add_argument("--gsp-groups", type=int, default=4)
    ap.add_argument("--gsp-system-len", type=int, default=2048)
    ap.add_argument("--gsp-question-len", type=int, default=128)
    ap.add_argument("--gsp-output-len", type=int, default=128)
    ap.add_argument("--gsp-turns", type=int, default=2)
    ap.add_argument("--need-level-s", type=float, default=12, help="time a sweep run needs at c <= 64 (scales with c)")
    ap.add_argument("--need-long-s", type=float, default=15)
    a = ap.parse_args()
    a.out, a.tokenizer = os.path.abspath(a.out), os.path.abspath(a.tokenizer)  # the run chdirs below
    if a.dry_run:  # tiny: 2 layers, short contexts, two levels of a few conversations
        a.long_ctx, a.long_new, a.longest_ctx, a.longest_new, a.longest_prompts = 300, 8, 256, 4, 1
        a.levels, a.convs, a.gsp_groups = "1,2", "2,4", 2
        a.gsp_system_len, a.gsp_question_len, a.gsp_output_len = 48, 8, 4
        a.budget_gb, a.max_running = 0.05, 8
        a.deadline_s = max(a.deadline_s, 1800)  # a 2-core CPU starts two servers in minutes
    os.makedirs(a.out, exist_ok=True)
    # 16 GB of random weights: written to RAM (tmpfs) when there is one, a disk may take minutes.
    shm = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 40e9 else None
    work = a.work or tempfile.mkdtemp(prefix="gpu_serving_", dir=shm)
    os.makedirs(os.path.join(work, "logs"), exist_ok=True)
    run = Run(a)
    run.work = work
    R = run.res
    dev = "cpu" if a.dry_run else "cuda"
    shape = dict(SHAPE)
    if a.dry_run:
        shape.update(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=49152)
    if a.layers:
        shape["num_hidden_layers"] = a.layers
        R["notes"].append(f"8B shape with {a.layers} layers instead of 32")
    R["setup"] = {"model": MODEL, "shape": shape, "kv_budget_gb": a.budget_gb, "max_running_requests": a.max_running,
                  "dry_run": a.dry_run, "sglang": sglang_version(),
                  "args": {k: v for k, v in vars(a).items() if k not in ("out", "tokenizer", "work", "quiet_file")}}
    R["notes"] += [
        "random weights of Llama-3.1-8B's shape; SGLang 0.5.23; both servers get identical flags except the "
        "method (and bf16's --attention-backend): the same --oscar-kv-budget-gb and --max-running-requests; "
        "no flag of this script disables decode CUDA graphs (servers.<name>.effective says what ran)",
        f"bf16 attention backend: {BF16_GPU_BACKEND} on CUDA. SGLang's default on Hopper is fa3 from sgl-kernel, "
        "which the GPU machine's SGLang bundle only stubs; triton is the fastest backend that runs from it",
        "GPU-machine bundle flags on both servers: --cuda-graph-backend-prefill disabled (prefill graphs need "
        "sgl-kernel), --sampling-backend pytorch, --skip-server-warmup (each server gets two warm-up requests "
        "instead); norms/activation/RoPE run through SGLang's torch paths (unfused) on both sides",
        f"--mem-fraction-static {a.mem_fraction} on both: the two servers share one GPU",
        "capacity_bound: this script's streaming client; decode_tok_per_s is the window in which every request "
        "decodes (ratios.capacity_bound_decode uses it), out_tok_per_s counts the whole wall time, prefill included",
        "bench_serving: SGLang's own client and metrics (output_throughput = output tokens / run duration; "
        "median TTFT/TPOT over requests); gsp = generated-shared-prefix, multi-turn through /v1/chat/completions "
        "(the client's multi-turn mode needs a chat backend), --flush-cache before each run; long = random-ids, "
        "token ids sent through /generate"]
    if a.dry_run:
        R["notes"].append("DRY RUN on the CPU: tiny model, numbers mean nothing")
    os.chdir(work)  # servers import the installed package, not this checkout

    ckpt = run.phase("checkpoint", lambda: make_checkpoint(os.path.join(work, MODEL), shape, a.tokenizer, dev))
    if not ckpt:
        return finish(run, work)
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    specs = [(m, server_flags(m, ckpt, a)) for m in METHODS]
    t = time.time()
    srv = run.phase("start-servers", lambda: start_all(specs, os.path.join(work, "logs"),
                                                       timeout=max(60, min(420, run.left() - 120))))
    if srv is None:
        return finish(run, work)
    R["startup_s"] = time.time() - t
    up = {}
    for name, s in srv.items():
        entry = R["servers"][name] = {"flags": dict(specs)[name]}
        if isinstance(s, Server):
            up[name] = s.url
            entry["launch"] = "python -m sglang_oscar.launch_server " + " ".join(s.args[3:])
            try:
                entry["effective"] = effective_settings(server_info(s.url))
            except Exception as e:  # noqa: BLE001
                entry["effective"] = f"server_info failed: {e!r}"
        else:
            entry["error"] = repr(s)
        log(f"server {name}: {'up ' + s.url if isinstance(s, Server) else 'FAILED ' + repr(s)}")
    run.save()
    try:
        body(run, a, up, ckpt, work)
    finally:
        stop_all([s for s in srv.values() if isinstance(s, Server)])
        finish(run, work)


def body(run, a, up, ckpt, work):
    R = run.res

    def capacity():
        cap = {m: serving.find_num(server_info(up[m]), "max_total_num_tokens") for m in METHODS if m in up}
        b, o = cap.get("bf16"), cap.get("oscar-2")
        R["capacity"] = {"tokens": cap, "kv_budget_gb": a.budget_gb, "max_running_requests": a.max_running}
        R["ratios"]["capacity"] = o / b if b and o else None
        log(f"capacity {cap} ratio {R['ratios']['capacity']}")
    run.phase("capacity", capacity)

    def warm():
        # Compiles what the first prefill and decode need (Triton kernels, the CUDA extension's first launch).
        rng = random.Random(7)
        out = {}
        for m in METHODS:
            if m in up:
                t = time.time()
                for n in (100, 1000):
                    r = requests.post(up[m] + "/generate", timeout=300, json={
                        "input_ids": [rng.randrange(1000, 40000) for _ in range(n)],
                        "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}})
                    r.raise_for_status()
                out[m] = time.time() - t
                requests.post(up[m] + "/flush_cache", timeout=60)
        R["warmup_s"] = out
    run.phase("warm-up", warm)

    if a.quiet_file:
        t = time.time()
        while not os.path.exists(a.quiet_file) and time.time() - t < a.quiet_wait_s:
            time.sleep(1)
        R["quiet_wait"] = {"waited_s": time.time() - t, "quiet": os.path.exists(a.quiet_file)}
        if not R["quiet_wait"]["quiet"]:
            R["notes"].append("the caller's GPU tests were still running when the measurements began")
        log(f"quiet wait {R['quiet_wait']}")

    def capacity_bound():
        for m in METHODS:
            if m not in up:
                continue
            tot = serving.find_num(server_info(up[m]), "max_total_num_tokens")
            # 5% margin: SGLang reserves decode room per running request; one queued request
            # would end the steady window (all decoding) before it starts.
            n = max(1, min(a.max_running, int(tot * 0.95) // (a.long_ctx + a.long_new + 64)))
            requests.post(up[m] + "/flush_cache", timeout=60)
            row = asyncio.run(long_ctx_run(up[m], n, a.long_ctx, a.long_new, seed=3,
                                           timeout_s=max(30, run.left() - 60)))
            row["method"] = m
            R["capacity_bound"].append(row)
            log(f"capacity-bound {m}: {n} x {a.long_ctx} tokens, decode {row.get('decode_tok_per_s') or 0:.1f} tok/s, "
                f"TPOT p50 {row.get('tpot_p50_ms') or 0:.2f} ms, peak running {row.get('peak_running_reqs')}, "
                f"errors {row['errors']}")
        by = {r["method"]: r.get("decode_tok_per_s") for r in R["capacity_bound"]}
        if by.get("bf16") and by.get("oscar-2"):
            R["ratios"]["capacity_bound_decode"] = by["oscar-2"] / by["bf16"]
    run.phase("capacity-bound", capacity_bound, need_s=90)

    run.phase("bench-serving", lambda: run_bench_serving(run, a, up, ckpt, work), need_s=40)


def ratios(R):
    """oscar-2 / bf16 from bench_serving's own numbers, per run kind and level."""
    res = {}
    for r in (R.get("bench_serving") or {}).get("runs", []):
        if r.get("result"):
            res[(r["kind"], r.get("concurrency"), r["method"])] = r["result"]

    def ratio(kind, c, key):
        b, o = res.get((kind, c, "bf16"), {}).get(key), res.get((kind, c, "oscar-2"), {}).get(key)
        return o / b if b and o else None
    levels = sorted({c for (k, c, _) in res if k == "gsp"})
    R["ratios"]["gsp_output_throughput"] = {str(c): ratio("gsp", c, "output_throughput") for c in levels}
    R["ratios"]["gsp_median_ttft"] = {str(c): ratio("gsp", c, "median_ttft_ms") for c in levels}
    R["ratios"]["gsp_median_tpot"] = {str(c): ratio("gsp", c, "median_tpot_ms") for c in levels}
    R["ratios"]["long_median_ttft"] = ratio("long", None, "median_ttft_ms")
    R["ratios"]["long_median_tpot"] = ratio("long", None, "median_tpot_ms")


def finish(run, work):
    R = run.res
    R["wall_s"] = time.time() - T0
    try:
        ratios(R)
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    run.save()
    write_outputs(run, work, lambda path: plot(R, path), "gpu_serving.png", summary(R))


def write_outputs(run, work, plot_fn, png, text):
    """Server logs (one file, the tail of each: only a few files come back from a run), the plot,
    and the summary (printed last)."""
    with open(os.path.join(run.a.out, "servers.log"), "w") as out:
        d = os.path.join(work, "logs")
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            with open(os.path.join(d, name), errors="replace") as f:
                lines = f.readlines()
            out.write(f"===== {name} ({len(lines)} lines, last 200) =====\n")
            out.writelines(lines[-200:])
    try:
        plot_fn(os.path.join(run.a.out, png))
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    text = run.paths_out(text)
    with open(os.path.join(run.a.out, "summary.txt"), "w") as f:
        f.write(text)
    print(text, flush=True)


def gsp_rows(R):
    return [r for r in (R.get("bench_serving") or {}).get("runs", []) if r["kind"] == "gsp" and r.get("result")]


def plot(R, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    color = {"bf16": "tab:gray", "oscar-2": "tab:blue"}
    fig, axes = plt.subplots(1, 5, figsize=(24, 4.8))
    cap = (R.get("capacity") or {}).get("tokens") or {}
    if cap:
        axes[0].bar(list(cap), [v or 0 for v in cap.values()], color=[color[m] for m in cap])
        axes[0].set_title(f"KV capacity (tokens) at {R['capacity']['kv_budget_gb']} GiB, "
                          f"x{R['ratios'].get('capacity') or 0:.2f}", fontsize=9)
    rows = gsp_rows(R)
    for ax, key, title in ((axes[1], "output_throughput", "output tok/s"),
                           (axes[2], "median_ttft_ms", "TTFT p50 (ms)"),
                           (axes[3], "median_tpot_ms", "TPOT p50 (ms)")):
        for m in METHODS:
            pts = sorted((r["concurrency"], r["result"].get(key)) for r in rows if r["method"] == m
                         and r["result"].get(key) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color=color[m], label=m)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bench_serving --max-concurrency")
        ax.set_title(f"shared-prefix multi-turn: {title}", fontsize=9)
        ax.legend(fontsize=8)
    cb = {r["method"]: r for r in R.get("capacity_bound") or []}
    longs = {r["method"]: r["result"] for r in (R.get("bench_serving") or {}).get("runs", [])
             if r["kind"] == "long" and r.get("result")}
    if cb:
        ms = [m for m in METHODS if m in cb]
        axes[4].bar(ms, [cb[m].get("decode_tok_per_s") or 0 for m in ms], color=[color[m] for m in ms])
        for i, m in enumerate(ms):
            axes[4].text(i, (cb[m].get("decode_tok_per_s") or 0), f"{cb[m]['concurrency']} reqs", ha="center",
                         va="bottom", fontsize=8)
    n_long = R["setup"]["args"]["longest_ctx"]
    extra = "\n".join(f"{m}: one {n_long}-token prompt, TTFT {longs[m].get('median_ttft_ms') or 0:.0f} ms, TPOT "
                      f"{longs[m].get('median_tpot_ms') or 0:.1f} ms" for m in METHODS if m in longs)
    axes[4].set_title(f"capacity-bound decode tok/s ({R['setup']['args']['long_ctx']}-token prompts)\n{extra}",
                      fontsize=8)
    hw = (R.get("hardware") or {}).get("name")
    fig.suptitle(f"SGLang {R['setup'].get('sglang')} bf16 vs sglang_oscar oscar-2 on {hw} "
                 f"({R['setup']['model']}, random weights)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def summary(R):
    """A short table of what was measured (printed last by gpu_serving.sh)."""
    f = lambda v, p=1: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    out = ["", f"== gpu_serving summary ({(R.get('hardware') or {}).get('name')}) ==",
           "phases: " + json.dumps(R.get("phases"))]
    for m, s in (R.get("servers") or {}).items():
        eff = s.get("effective") if isinstance(s.get("effective"), dict) else {}
        keys = [k for k in ("attention_backend", "cuda_graph_backend_decode", "cuda_graph_max_bs_decode",
                            "page_size", "max_running_requests") if k in eff]
        out.append(f"server {m}: " + (", ".join(f"{k}={eff[k]}" for k in keys) or s.get("error", "?")))
    cap = (R.get("capacity") or {}).get("tokens") or {}
    out.append(f"capacity tokens: {cap}  ratio {f(R['ratios'].get('capacity'), 2)}")
    for r in R.get("capacity_bound") or []:
        out.append(f"capacity-bound {r['method']:8s} {r['concurrency']:3d} x {r['ctx']}: decode "
                   f"{f(r.get('decode_tok_per_s'))} tok/s, TPOT p50 {f(r.get('tpot_p50_ms'), 2)} ms, "
                   f"errors {r['errors']}")
    out.append(f"capacity-bound decode ratio: {f(R['ratios'].get('capacity_bound_decode'), 2)}")
    out.append(f"{'bench_serving run':24s} {'status':8s} {'done':>5s} {'out tok/s':>10s} {'TTFT p50':>9s} "
               f"{'TPOT p50':>9s} {'hit %':>6s}")
    for r in (R.get("bench_serving") or {}).get("runs", []):
        res = r.get("result") or {}
        hit = (res.get("cache_report") or {}).get("cache_hit_rate_pct")
        out.append(f"{r['name']:24s} {r['status'][:8]:8s} {str(res.get('completed', '-')):>5s} "
                   f"{f(res.get('output_throughput')):>10s} {f(res.get('median_ttft_ms')):>9s} "
                   f"{f(res.get('median_tpot_ms'), 2):>9s} {f(hit):>6s}")
    rt = R.get("ratios") or {}
    out.append("oscar-2/bf16 gsp output tok/s by concurrency: "
               + json.dumps({c: None if v is None else round(v, 2) for c, v in
                             (rt.get("gsp_output_throughput") or {}).items()}))
    out.append(f"oscar-2/bf16 long prompt: TTFT {f(rt.get('long_median_ttft'), 2)}x, "
               f"TPOT {f(rt.get('long_median_tpot'), 2)}x")
    out.append(f"wall {f(R.get('wall_s'), 0)} s")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
