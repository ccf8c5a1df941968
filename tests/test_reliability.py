"""Reliability of the real SGLang server with oscar-2 on the CPU: a soak, faults mid-flight, memory pressure.

One module-scoped server with a tiny KV budget, so a handful of long conversations overflow the pool.
SGLang's own invariant checks run inside the scheduler on every step (strict busy-time pool
conservation, KV page use-after-free / double-free) and raise there, so any leak they see shows up here
as failed requests; the plugin's tree_check (debug env) reports radix tree consistency.
"""
from __future__ import annotations

import json
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from sglang_oscar.plugin import DEBUG_ENV
from sglang_oscar.serve import Server

pytestmark = pytest.mark.server
PAGE = 64
MAX_RUNNING = 8
# ~21 MB: the residual (one bf16 page per request row, MAX_RUNNING + 2 rows, ~15 MB here) plus room
# for roughly 1.5k packed tokens.
BUDGET_GB = 0.02
SOAK = int(os.environ.get("OSCAR_SOAK_CONVERSATIONS", "200"))
CHECK_ENV = {DEBUG_ENV: "1", "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",
             "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1"}
# Asked so that the answer has a margin (see test_server.PARIS: the bare question is a coin flip on
# float rounding for oscar-2)
PARIS = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "reliability.log"
    # An optimistic admission estimate (SGLang reserves conservativeness x 0.7 x max_new_tokens per
    # running request): prompts are admitted until the pool is full, so decode runs out of pages and
    # SGLang must retract requests (the memory-pressure test asserts that it did).
    # Page prefill: the memory-pressure test scores every served token teacher-forced in one cold
    # request, the computation that produced it only where prefill reads pages as decode does.
    with Server(["--oscar-kv-budget-gb", str(BUDGET_GB), "--enable-cache-report", "--oscar-prefill", "page",
                 "--max-running-requests", str(MAX_RUNNING), "--schedule-conservativeness", "0.05"],
                env=CHECK_ENV, log_path=log) as s:
        s.log = log
        yield s


def wait_idle(srv, timeout=120):
    """Until the scheduler runs and queues nothing (aborted requests are released asynchronously)."""
    srv.wait_idle(timeout)


def assert_clean(srv):
    """Idle, tree consistent, and after /flush_cache every token of the pool free again."""
    wait_idle(srv)
    state = srv.oscar_state()
    assert state["tree_check"]["ok"], state["tree_check"]
    srv.flush()
    state = srv.oscar_state()
    assert state["available_tokens"] == state["max_total_num_tokens"], state
    assert state["tree_check"]["ok"] and state["tree_check"]["tree_tokens"] == 0, state["tree_check"]


def assert_paris(srv):
    r = srv.chat(PARIS, max_tokens=16)
    assert "Paris" in r["choices"][0]["message"]["content"]


def test_soak_multi_turn_no_errors_no_leak(srv, record_property):
    srv.flush()
    total = srv.oscar_state()["max_total_num_tokens"]
    system = "You are a concise assistant. " + " ".join(f"Note {i}: keep answers short." for i in range(12))
    errors, cached = [], []

    def conversation(i):
        rng = random.Random(i)
        msgs = [{"role": "system", "content": system},
                {"role": "user", "content": f"Customer {i} asks about order {rng.randrange(10**6)}."}]
        try:
            for turn in range(rng.choice([2, 3])):
                r = srv.chat(msgs, max_tokens=rng.choice([4, 6, 8]))
                if not r["choices"][0]["message"]["content"] and r["usage"]["completion_tokens"] == 0:
                    raise AssertionError(f"empty answer: {r}")
                cached.append(r["usage"]["prompt_tokens_details"]["cached_tokens"])
                msgs += [r["choices"][0]["message"], {"role": "user", "content": f"And point {turn}?"}]
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e)[:300])

    t0 = time.time()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(conversation, range(SOAK)))
    record_property("soak_conversations", SOAK)
    record_property("soak_seconds", round(time.time() - t0, 1))
    assert not errors, errors[:5]
    assert len(cached) >= 2 * SOAK
    assert sum(c >= PAGE for c in cached) >= len(cached) // 2  # the shared system prompt is served from the tree
    mid = srv.oscar_state()
    assert mid["tree_check"]["ok"] and mid["tree_check"]["pages"] > 0, mid["tree_check"]
    assert_clean(srv)
    assert srv.oscar_state()["available_tokens"] == total
    assert_paris(srv)


def test_client_disconnect_during_streaming(srv):
    body = {"model": "default", "messages": [{"role": "user", "content": "Count from one to one hundred."}],
            "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    with requests.post(srv.url + "/v1/chat/completions", json=body, stream=True, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith(b"data:") and b"content" in line:
                break  # first token arrived: hang up mid-generation
    assert_clean(srv)
    assert_paris(srv)


def test_abort_request_by_rid(srv):
    out = {}

    def long_request():
        out["r"] = requests.post(srv.url + "/generate", timeout=300, json={
            "rid": "reliability-abort", "text": "Once upon a time",
            "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}})

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        if requests.get(srv.url + "/v1/loads", timeout=60).json()["loads"][0].get("num_running_reqs"):
            break
        time.sleep(0.2)
    assert requests.post(srv.url + "/abort_request", json={"rid": "reliability-abort"}, timeout=60).status_code == 200
    t.join(300)
    r = out["r"]
    if r.status_code == 200:  # a clean, early finish marked as an abort
        meta = r.json()["meta_info"]
        assert meta["finish_reason"]["type"] == "abort", meta
        assert meta["completion_tokens"] < 400
    else:
        assert 400 <= r.status_code < 600 and r.status_code != 500, r.text
    assert_clean(srv)
    assert_paris(srv)


def test_flush_cache_while_requests_run(srv):
    msgs = [{"role": "user", "content": f"Write a short poem about the number {i}."} for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        futs = [pool.submit(srv.chat, [m], 24) for m in msgs]
        time.sleep(1.0)
        flushes = [requests.post(srv.url + "/flush_cache", timeout=60).status_code for _ in range(3)]
        results = [f.result() for f in futs]
    # SGLang refuses (400) to flush while requests run, or flushes if they already finished.
    assert all(code in (200, 400) for code in flushes), flushes
    assert all(r["usage"]["completion_tokens"] > 0 for r in results)
    assert_clean(srv)
    assert_paris(srv)


def test_context_length_exceeded_gets_400(srv):
    ctx = srv.info()["max_total_num_tokens"], srv.info().get("context_length")
    too_long = [1000 + i % 30000 for i in range(9000)]  # past SmolLM2's 8192-token context
    r = requests.post(srv.url + "/generate", json={"input_ids": too_long,
                                                   "sampling_params": {"max_new_tokens": 4}}, timeout=120)
    assert r.status_code == 400, (ctx, r.status_code, r.text[:200])
    r = requests.post(srv.url + "/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": "hello " * 9000}], "max_tokens": 4})
    assert r.status_code == 400, r.text[:200]
    assert_paris(srv)


@pytest.mark.parametrize("body", [
    "{not json",
    json.dumps({"model": "default", "messages": "not a list"}),
    json.dumps({"model": "default", "messages": PARIS, "max_tokens": "ten"}),
    json.dumps({"model": "default", "messages": PARIS, "temperature": "hot"}),
    json.dumps({"model": "default", "messages": [{"role": "user", "content": 42}]}),
    json.dumps({"model": "default", "messages": PARIS, "max_tokens": -1}),
    json.dumps({"model": "default", "messages": PARIS, "max_tokens": 10**9}),
], ids=["malformed-json", "messages-not-list", "max-tokens-str", "temperature-str", "content-int",
        "max-tokens-negative", "max-tokens-huge"])
def test_bad_requests_get_4xx(srv, body):
    r = requests.post(srv.url + "/v1/chat/completions", data=body,
                      headers={"content-type": "application/json"}, timeout=120)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:200])
    assert_paris(srv)


def test_max_tokens_zero_and_n_greater_than_one(srv):
    r = requests.post(srv.url + "/v1/chat/completions", timeout=120,
                      json={"model": "default", "messages": PARIS, "max_tokens": 0})
    if r.status_code == 200:  # a clean finish with nothing generated
        assert r.json()["usage"]["completion_tokens"] == 0
    else:
        assert 400 <= r.status_code < 500, r.text[:200]
    r = requests.post(srv.url + "/v1/chat/completions", timeout=300,
                      json={"model": "default", "messages": PARIS, "max_tokens": 12, "n": 3, "temperature": 0.7})
    if r.status_code == 200:
        choices = r.json()["choices"]
        assert sorted(c["index"] for c in choices) == [0, 1, 2]
        assert all(c["message"]["content"] for c in choices)
    else:
        assert 400 <= r.status_code < 500, r.text[:200]
    assert_clean(srv)
    assert_paris(srv)


def english_ids(srv, n_tokens, seed):
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(srv.info()["tokenizer_path"])
    keys = sorted(k for k, v in topics.items() if len(v) > 6000)
    return tok(topics[keys[seed % len(keys)]])["input_ids"][:n_tokens]


def two_turns(srv, prefix, follow_up, n_new=8):
    """Turn 1 on `prefix`; turn 2 on prefix + answer + follow_up. Returns (out1, out2, cached2)."""
    a = srv.generate(prefix, max_new_tokens=n_new)
    b = srv.generate(prefix + a["output_ids"] + follow_up, max_new_tokens=n_new)
    return a["output_ids"], b["output_ids"], b["meta_info"]["cached_tokens"]


def forced_gaps(srv, context, tokens):
    """For each of `tokens` after `context`: log-prob of the best token minus that of the given one,
    scored in one prefill on the server (an idle, unpressured pass)."""
    # SGLang reports no log-prob for the token at logprob_start_len itself, so start one earlier.
    r = srv.generate(context + tokens, max_new_tokens=1, return_logprob=True,
                     logprob_start_len=len(context) - 1, top_logprobs_num=1)
    meta = r["meta_info"]
    given, top = meta["input_token_logprobs"][-len(tokens):], meta["input_top_logprobs"][-len(tokens):]
    assert [tid for _, tid, _ in given] == tokens
    chosen, best = [lp for lp, _, _ in given], [t[0][0] for t in top]
    return [b - c for b, c in zip(best, chosen)]


def retractions(srv) -> int:
    """Requests SGLang's scheduler retracted so far (its warning line on a full KV pool)."""
    text = open(srv.log, errors="replace").read()
    return sum(int(m) for m in re.findall(r"KV cache pool is full\. Retract requests\. #retracted_reqs: (\d+)", text))


def test_memory_pressure_queues_evicts_and_recomputes(srv, record_property):
    """More long two-turn conversations at once than the pool holds: they queue and are retracted (the
    scheduler's log must show it), their prefixes are evicted and recomputed, and every answer is
    still the model's own greedy answer.

    Exact token equality with a one-at-a-time run is reported, not asserted: bf16 matmuls on a CPU round
    differently with the batch shape, so near-ties flip and the continuation then differs (plain
    SGLang does the same). Instead every token produced under pressure is scored teacher-forced by
    the idle server: a greedy token from the right KV is at (or within rounding of) the arg-max,
    while a token from evicted-and-wrongly-recomputed or foreign KV is nats away from it.
    """
    srv.flush()
    total = srv.oscar_state()["max_total_num_tokens"]
    n_conv = MAX_RUNNING
    plen = max(2 * PAGE, total // 4 // PAGE * PAGE)  # ~4 conversations fit; MAX_RUNNING run at once
    prefixes = [english_ids(srv, plen, seed) for seed in range(n_conv)]
    follow = english_ids(srv, 24, 99)
    assert all(len(p) == plen for p in prefixes)

    # Pressured: all at once; together they need ~2x the pool, so requests queue or are retracted and
    # the prefixes of earlier turns get evicted and recomputed.
    peak = {"used": 0, "waiting": 0}
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                load = requests.get(srv.url + "/v1/loads", timeout=30).json()["loads"][0]
                peak["used"] = max(peak["used"], load.get("num_used_tokens", 0))
                peak["waiting"] = max(peak["waiting"], load.get("num_waiting_reqs", 0))
            except requests.RequestException:
                pass
            time.sleep(0.25)

    retracted_before = retractions(srv)
    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(n_conv) as pool:
            got = list(pool.map(lambda p: two_turns(srv, p, follow), prefixes))
    finally:
        stop.set()
        poller.join()
    retracted = retractions(srv) - retracted_before
    record_property("pressure_retracted_requests", retracted)
    assert retracted > 0, "the pool never ran out during decode: the retract path did not run"
    record_property("pressure_peak_used_tokens", peak["used"])
    record_property("pressure_peak_waiting", peak["waiting"])
    record_property("pressure_pool_tokens", total)
    assert n_conv * (plen + 40) > 1.5 * total  # the test really oversubscribes the pool
    assert all(len(g1) == 8 and len(g2) == 8 for g1, g2, _ in got)

    # Teacher-forced check of every pressured answer, one conversation at a time on a cold cache.
    gaps, exact = [], []
    for p, (g1, g2, _) in zip(prefixes, got):
        srv.flush()
        gaps += forced_gaps(srv, p, g1)
        gaps += forced_gaps(srv, p + g1 + follow, g2)
        srv.flush()
        r1, r2, _ = two_turns(srv, p, follow)
        exact += [sum(u == v for u, v in zip(r, g)) / len(r) for r, g in ((r1, g1), (r2, g2))]
    record_property("pressure_exact_agreement", sum(exact) / len(exact))
    record_property("pressure_max_forced_gap", max(gaps))
    print(f"pressure: exact agreement {sum(exact) / len(exact):.3f}, teacher-forced gap to arg-max: "
          f"max {max(gaps):.3f} mean {sum(gaps) / len(gaps):.4f} nats over {len(gaps)} tokens")
    # Near-ties only: a flipped token sits within bf16 rounding of the best; wrong KV is nats off.
    assert max(gaps) < 1.5, gaps
    assert sum(gaps) / len(gaps) < 0.1, gaps
    assert sum(g < 1e-6 for g in gaps) >= 0.75 * len(gaps), gaps
    assert_clean(srv)
    assert_paris(srv)
