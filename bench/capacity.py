"""KV capacity at one fixed memory budget: plain SGLang bf16 vs oscar-2 / oscar-4, from the real servers.

Each server starts with the same `--oscar-kv-budget-gb` (the bytes SGLang's own pool sizing may spend
on KV); the token counts are what SGLang itself reports in /server_info (`max_total_num_tokens`).

    python bench/capacity.py                 # -> bench/results/capacity.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from sglang_oscar.serve import Server

RESULTS = Path(__file__).resolve().parent / "results"


def measure(method_args, budget_gb, log_dir):
    name = "-".join(method_args[1::2]) if method_args else "oscar-2"
    with Server(["--oscar-kv-budget-gb", str(budget_gb), *method_args],
                log_path=Path(log_dir) / f"{name}.log") as s:
        info = s.info()
        out = {"max_total_num_tokens": int(info["max_total_num_tokens"]),
               "attention_backend": info["attention_backend"], "model_path": info["model_path"]}
        if "oscar" in info:
            state = s.oscar_state()
            out.update(fingerprint=state["fingerprint"], bytes_per_token=state["bytes_per_token"],
                       bf16_bytes_per_token=state["bf16_bytes_per_token"])
        return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-gb", type=float, default=2.0)
    ap.add_argument("--out", default=str(RESULTS / "capacity.json"))
    args = ap.parse_args()
    t0 = time.time()
    logs = tempfile.mkdtemp(prefix="capacity-")
    bf16 = measure(["--oscar-method", "bf16"], args.budget_gb, logs)
    o2 = measure(["--oscar-method", "oscar", "--oscar-bits", "2"], args.budget_gb, logs)
    o4 = measure(["--oscar-method", "oscar", "--oscar-bits", "4"], args.budget_gb, logs)
    res = {
        "bf16_tokens": bf16["max_total_num_tokens"],
        "oscar_tokens": o2["max_total_num_tokens"],
        "ratio": o2["max_total_num_tokens"] / bf16["max_total_num_tokens"],
        "oscar4_tokens": o4["max_total_num_tokens"],
        "oscar4_ratio": o4["max_total_num_tokens"] / bf16["max_total_num_tokens"],
        "settings": {"kv_budget_gb": args.budget_gb, "page_size": 64,
                     "model": Path(bf16["model_path"]).name,
                     "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores (SGLang CPU engine)",
                     "servers": {"bf16": bf16, "oscar-2": o2, "oscar-4": o4}},
        "elapsed_s": round(time.time() - t0),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"bf16 {res['bf16_tokens']} tokens, oscar-2 {res['oscar_tokens']} ({res['ratio']:.2f}x), "
          f"oscar-4 {res['oscar4_tokens']} ({res['oscar4_ratio']:.2f}x) at {args.budget_gb} GB")


if __name__ == "__main__":
    main()
