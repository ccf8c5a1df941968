"""Hit vs miss on the real server, per prefill mode: how much a radix hit moves the scores.

For each of N windows of real English text: the log-prob of every token after the first S tokens
(S whole pages), scored cold (nothing cached) and again with those S tokens cached by an earlier
request; reports the mean / max |difference| and the fraction of tokens scored identically.
Servers run one after the other: oscar-2 with --oscar-prefill page, with chunk, and plain bf16
(whose differences are the arithmetic's own: a different batch shape rounds differently).

    python bench/prefill_modes.py            # -> bench/results/prefill_modes.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from accuracy import TEXT_DIR, TEXT_DOCS  # noqa: E402  (the accuracy study's texts)
from sglang_oscar.model import default_model_path  # noqa: E402
from sglang_oscar.serve import Server  # noqa: E402

DOCS = TEXT_DOCS[:6]
MODES = [("oscar-2 page", ["--oscar-prefill", "page"]), ("oscar-2 chunk", ["--oscar-prefill", "chunk"]),
         ("bf16", ["--oscar-method", "bf16"])]


def windows(n_tokens):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_path())
    return [tok((TEXT_DIR / d).read_text(encoding="utf-8", errors="replace")).input_ids[:n_tokens] for d in DOCS]


def scores(server, ids, start, cache_prefix):
    server.flush()
    if cache_prefix:  # another request leaves the first `start` tokens' pages in the radix tree
        server.generate(ids[:start] + [13] * 40, max_new_tokens=1)
    r = server.generate(ids, max_new_tokens=1, return_logprob=True, logprob_start_len=start)
    cached = r["meta_info"].get("cached_tokens", 0)
    if cache_prefix and cached < start:
        raise RuntimeError(f"expected a hit of {start} tokens, got {cached}")
    if not cache_prefix and cached:
        raise RuntimeError("expected a cold miss")
    return [t[0] for t in r["meta_info"]["input_token_logprobs"][1:]]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=768)
    ap.add_argument("--start", type=int, default=384, help="cached prefix (a multiple of the page size)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "prefill_modes.json"))
    a = ap.parse_args()
    texts = windows(a.tokens)
    rows = []
    for name, flags in MODES:
        t0 = time.time()
        with Server(["--oscar-kv-budget-gb", "2", "--enable-cache-report", "--max-running-requests", "4", *flags]) as s:
            gaps = []
            for ids in texts:
                miss, hit = scores(s, ids, a.start, False), scores(s, ids, a.start, True)
                gaps += [abs(x - y) for x, y in zip(miss, hit)]
        rows.append(dict(mode=name, tokens=len(gaps), mean_gap=sum(gaps) / len(gaps), max_gap=max(gaps),
                         identical=sum(g == 0 for g in gaps) / len(gaps), wall_s=round(time.time() - t0)))
        print(rows[-1], flush=True)
    res = dict(rows=rows, model="SmolLM2-135M-Instruct", texts=f"{len(texts)} windows of {a.tokens} tokens from "
               f"/usr/share/common-licenses ({', '.join(DOCS)})", cached_prefix=a.start,
               hardware=f"CPU ({platform.machine()}, {os.cpu_count()} cores), real SGLang server",
               metric="teacher-forced |log p| difference (nats) of each token after the cached prefix, hit vs miss")
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
