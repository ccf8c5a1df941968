"""Several `python -m sglang.bench_serving` runs in one process (SGLang's client imports for seconds per start).

    python bench/bench_serving_runs.py PLAN.json

PLAN.json: {"deadline": unix time, "runs": [{"name": str, "argv": [bench_serving flags], "need_s": float}]}.
Each run is exactly `python -m sglang.bench_serving ARGV`: its own argument parser and run_benchmark, with
sys.argv set to ARGV; its result is the JSONL line it appends to its --output-file. A run that would
not finish by the deadline (need_s) is skipped. One status line per run goes to PLAN.json's sibling
`<plan>.status.jsonl` as it ends, so a caller that kills this process still knows what ran.
"""
from __future__ import annotations

import json
import sys
import time
import traceback


def main(plan_path):
    with open(plan_path) as f:
        plan = json.load(f)
    import warnings
    warnings.simplefilter("ignore", FutureWarning)  # sglang.bench_serving's own deprecation notice
    from sglang.bench_serving import cli_main

    status_path = plan_path + ".status.jsonl"
    for run in plan["runs"]:
        left = plan["deadline"] - time.time()
        st = {"name": run["name"], "argv": run["argv"]}
        if left < run.get("need_s", 0):
            st.update(status="skipped (time)", left_s=left)
        else:
            t = time.time()
            print(f"==== bench_serving {run['name']}: {' '.join(run['argv'])}", flush=True)
            sys.argv = ["sglang.bench_serving", *run["argv"]]
            try:
                cli_main()
                st["status"] = "ok"
            except SystemExit as e:  # its own error exits (server not ready, bad flags)
                st["status"] = f"exit {e.code}"
            except Exception as e:  # noqa: BLE001 - one failed run must not lose the others
                traceback.print_exc()
                st["status"] = f"failed: {e!r}"[:400]
            st["wall_s"] = time.time() - t
        print(f"==== {run['name']}: {st['status']}", flush=True)
        with open(status_path, "a") as f:
            f.write(json.dumps(st) + "\n")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python bench/bench_serving_runs.py PLAN.json")
    main(sys.argv[1])
