"""bench/accuracy.py --sweep: group requests, the warm cache, the design points and their cost, and
the reference-only options kept off the server."""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import accuracy as A  # noqa: E402

from sglang_oscar.config import OscarConfig  # noqa: E402

SINK_HEAD = OscarConfig(raw_first_page=True, key_norm="head")


@pytest.fixture(scope="module")
def eng(default_model_dir):
    return A.Engine(default_model_dir, "cpu")


@pytest.fixture(scope="module")
def ids(eng):
    text = eng.tok((A.TEXT_DIR / "GPL-3").read_text()).input_ids
    return [text[:150], text[300:450]]


@pytest.mark.parametrize("cfg", [OscarConfig(), SINK_HEAD, OscarConfig(method="bf16")],
                         ids=["oscar-2", "sink+head-norm", "bf16"])
def test_a_group_request_computes_what_its_sequences_compute_alone(eng, ids, cfg):
    """One group of two sequences through prefill, decode and a radix-style prefix == each sequence on
    its own: the prefill bit for bit here; after it a batched attention sums in another order (fp32
    rounding), which 2-bit pages amplify over 30 layers, so decode is checked loosely end to end and
    exactly where it cannot drift (layer 0's cache, whose K/V depend on the tokens alone)."""
    group = eng.new(cfg, 2)
    got = [eng.forward(cfg, [group], ids)]
    alone = [eng.new(cfg) for _ in ids]
    want = [torch.cat([eng.forward(cfg, [r], [x]) for r, x in zip(alone, ids)])]
    for t in (7, 9):   # decode 150 -> 152: no page completes; the prefix below reads the packed ones
        got.append(eng.forward(cfg, [group], [[t], [t]], decode=True))
        want.append(torch.cat([eng.forward(cfg, [r], [[t]], decode=True) for r in alone]))
    hit = group.prefix(140, cfg)
    assert hit.length == (128 if cfg.quantized else 140) and hit.batch == 2
    got.append(eng.forward(cfg, [hit], [x[hit.length:150] for x in ids]))
    hits = [r.prefix(140, cfg) for r in alone]
    want.append(torch.cat([eng.forward(cfg, [h], [x[h.length:150]]) for h, x in zip(hits, ids)]))
    assert float((got[0] - want[0]).abs().max()) < 1e-3
    for g, w in zip(got, want):
        lg, lw = torch.log_softmax(g, -1), torch.log_softmax(w, -1)
        assert torch.equal(g.argmax(-1), w.argmax(-1))
        assert float((lg - lw).abs().mean()) < 0.3   # a wrong page or position costs nats
    lc = group.layers[0]
    for i, r in enumerate(alone):
        assert torch.equal(lc.raw_k[i], r.layers[0].raw_k) and lc.raw_start == r.layers[0].raw_start
        if cfg.quantized:
            assert all(torch.equal(lc.pages[f][i], r.layers[0].pages[f]) for f in lc.pages)
    if cfg.quantized:
        assert lc.n_pages == 2 and lc.raw_k.shape[:2] == (2, 152 - 128)
        assert (lc.sink_k is not None) == cfg.raw_first_page
        if cfg.raw_first_page:  # the sink is page 0's raw K, shared by the prefix without a copy
            assert torch.equal(lc.sink_k[1], alone[1].layers[0].sink_k)
            assert hit.layers[0].sink_k is lc.sink_k
        if cfg.key_norm == "head":
            assert lc.pages["k_norm"].shape == (2, 2, 64, 3)


def test_sweep_points_most_informative_first_and_each_once():
    names = [A.point_name(c) for c in A.sweep_points()]
    assert names[:8] == ["bf16", "kivi-2/p64/chunk", "oscar-2/p64/chunk", "oscar-2/p64/page", "oscar-2/p128/chunk",
                         "oscar-2/p64/chunk/sink", "oscar-2/p64/chunk/head-norm", "oscar-2/p256/chunk"]
    assert len(names) == len(set(names)) == 3 + 24 - 1 + 2   # the 24-point grid holds the default
    assert A.point_name(OscarConfig()) == "oscar-2/p64/chunk"   # the heat map's "default" follows the config


def test_capacity_model_matches_the_serving_count():
    """The default's ratio is the GPU serving run's (SGLang counted 4.63x: 303,552 / 65,536 tokens);
    every option that costs bytes shows it."""
    cap = lambda c: A.capacity(c, **A.SERVING_SHAPE)["capacity_ratio"]  # noqa: E731
    assert cap(OscarConfig(method="bf16")) == 1.0
    assert abs(cap(OscarConfig()) - 303552 / 65536) < 0.02
    base = cap(OscarConfig())
    for option in (dict(page_size=128), dict(raw_first_page=True), dict(key_norm="head")):
        assert cap(dataclasses.replace(OscarConfig(), **option)) < base, option
    assert A.capacity(OscarConfig(), **A.SERVING_SHAPE)["bytes_per_token_layer"] == 772


def test_equal_length_prompts_and_the_heat_map(eng, tmp_path):
    docs = A.load_text(eng.tok, quick=True)
    prompts = A.chat_prompts_equal(eng.tok, docs, 6, 300)
    assert {len(p) for p in prompts} == {300} and len({tuple(p) for p in prompts}) == 6
    assert eng.tok.decode(prompts[0]).rstrip().endswith("assistant")
    # a partial sweep JSON draws its heat map (cells without trials stay blank)
    hits = {"cold": {"512": [1, 0, 1, 1]}, "warm": {"512": [1, 1, 0, 1]}}
    rows = [{"name": n, "method": m, "bits": 2, "page_size": 64, "ppl": 10.0, "passkey": {"512": 0.75},
             "passkey_hits": hits} for n, m in (("bf16", "bf16"), (A.point_name(OscarConfig()), "oscar"))]
    res = {"model": "m", "hardware": "h", "sweep": True, "rows": rows, "agreement": {"generated_tokens": 8},
           "passkey": {"lengths": [512, 1024], "trials": 4}}
    path = tmp_path / "s.json"
    path.write_text(json.dumps(res))
    A.draw(res, path)
    assert (tmp_path / "s_needle.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0


def test_reference_only_options_are_refused_by_the_server(tmp_path):
    from sglang_oscar.launch_server import parse_sglang_args, refusal
    (tmp_path / "config.json").write_text("{}")
    sg = parse_sglang_args(["--model-path", str(tmp_path)])
    assert refusal(sg, OscarConfig()) is None
    for cfg in (OscarConfig(raw_first_page=True), OscarConfig(key_norm="head")):
        assert "only in the torch reference" in refusal(sg, cfg)
    # the default configs keep the fingerprints servers report; an option changes the bytes, so the digest
    assert OscarConfig().fingerprint() == "oscar-2/p64/92c77a0ec7af"
    assert len({OscarConfig().fingerprint(), OscarConfig(raw_first_page=True).fingerprint(),
                OscarConfig(key_norm="head").fingerprint()}) == 3
    with pytest.raises(ValueError, match="token-norm"):
        OscarConfig(method="kivi", key_norm="head")
