"""Accuracy of bf16 / KIVI / QuaRot / OScaR KV caches on the real default model, in-process (transformers).

Every attention call goes through the functions the server's pool and backend use: full pages are
packed with quant.store_pages, and queries attend through reference.attend with their quantized
boundaries from reference.boundaries. A per-request, per-layer cache holds the packed pages and the
raw (bf16) tail, so prefix sharing, cache hits and decode are incremental, as in the server.

    python bench/accuracy.py            # the full study -> bench/results/accuracy.{json,png}
    python bench/accuracy.py --quick    # a small smoke run (written to the temp dir)
    python bench/accuracy.py --resume   # continue an interrupted run from its JSON
    python bench/accuracy.py --sweep --device cuda --budget-s 500   # the powered design-point study,
        # cold and warm, most informative points first -> bench/results/accuracy_sweep.{json,png},
        # accuracy_sweep_needle.png (add --resume to continue it in a later call)
    python bench/accuracy.py --attention backend --device cuda   # oscar-2/-4 (page 64) through the
        # serving backend (CUDA kernels) -> bench/results/accuracy_kernels_h200.json (on an H200),
        # each metric next to the reference row of accuracy.json and the difference
    python bench/accuracy.py --quick --rows oscar-2-64,oscar-4-64   # then the same with
        # --attention backend: a quick reference run, and the backend run compared with it

--attention backend sends every attention call through the real serving backend instead
(backend.OscarAttnBackend.detached over a fake paged pool, driven with fake ForwardBatches as
SGLang drives it: init_forward_metadata per forward, forward_extend / forward_decode per layer): the
CUDA store, extend and decode kernels on a GPU that runs them, the batched torch path elsewhere. The
semantics are the reference's (page prefill; passkey trials reuse the base prompt's pages as a
radix hit), so its rows should match the reference rows up to rounding.

Results are rewritten after every finished piece, so a long run can be read while it goes on.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import random
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

from sglang_oscar import layout
from sglang_oscar.config import OscarConfig
from sglang_oscar.fold import fold_v_rotation
from sglang_oscar.model import MODEL_NAME, default_model_path
from sglang_oscar.quant import store_pages
from sglang_oscar.reference import attend, boundaries

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fake_sglang  # noqa: E402  (tests/fake_sglang.py: the fakes every driver of the detached backend uses)

ATTN = "oscar_bench"
BLOCK = 512  # query block: keys past a block's last query are never scored (block-causal)
MAIN_ROWS = [("bf16", 2, 64), ("kivi", 2, 64), ("quarot", 2, 64), ("oscar", 2, 64),
             ("oscar", 4, 64), ("oscar", 2, 32), ("oscar", 2, 128), ("kivi", 4, 64), ("quarot", 4, 64)]
BACKEND_ROWS = "oscar-2-64,oscar-4-64"  # --attention backend's default rows (the two)
PPL_TOLERANCE = 0.05  # backend vs reference perplexity: "within noise" (the bar)
# Real long-form English text that ships with every Debian system (package base-files).
TEXT_DIR = Path("/usr/share/common-licenses")
TEXT_DOCS = ["GPL-3", "LGPL-2.1", "MPL-1.1", "GFDL-1.3", "GPL-2", "MPL-2.0", "GPL-1", "Apache-2.0"]
WINDOW = 2048  # scoring window: each document is cut into windows of at most this many tokens
MIN_WINDOW = 1024  # a document's shorter remainder is dropped


# ---- the cache: per request, per layer ----------------------------------------------------------
@dataclasses.dataclass
class LayerCache:
    """One layer's KV of a request; a group request (Request(batch=b)) holds b sequences with the
    same positions, every tensor with a leading dim b (one batched call instead of b)."""
    pages: dict | None = None       # packed full pages 0..n-1 (layout.FIELDS, page dim after the batch dim)
    raw_k: torch.Tensor | None = None  # raw bf16 keys/values at positions raw_start ...
    raw_v: torch.Tensor | None = None
    raw_start: int = 0
    sink_k: torch.Tensor | None = None  # cfg.raw_first_page: raw K/V of page 0 (kept once it is packed)
    sink_v: torch.Tensor | None = None

    @property
    def n_pages(self):
        return 0 if self.pages is None else self.pages["k_codes"].shape[-5]


def slice_pages(pages, n, lead=0):
    return None if pages is None or n == 0 else {k: v.narrow(lead, 0, n) for k, v in pages.items()}


class Request:
    """One sequence's KV state across all layers, or (batch=b) a group of b sequences that share
    their positions: the passkey trials of one length, the equal-length chat prompts."""

    def __init__(self, n_layers, batch=None):
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.length = 0
        self.batch = batch

    @property
    def lead(self):
        return 0 if self.batch is None else 1

    def prefix(self, n_tokens, cfg):
        """A new request holding only what the radix tree would give it: the first n_tokens
        (whole packed pages for quantized methods, raw for bf16). A view: shares tensors."""
        r, d = Request(0, self.batch), self.lead
        for lc in self.layers:
            if cfg.quantized:
                n = n_tokens // cfg.page_size
                c = LayerCache(slice_pages(lc.pages, n, d), lc.raw_k.narrow(d, 0, 0), lc.raw_v.narrow(d, 0, 0),
                               n * cfg.page_size, *((lc.sink_k, lc.sink_v) if n else (None, None)))
            else:
                c = LayerCache(None, lc.raw_k.narrow(d, 0, n_tokens), lc.raw_v.narrow(d, 0, n_tokens), 0)
            r.layers.append(c)
        r.length = n_tokens - n_tokens % cfg.page_size if cfg.quantized else n_tokens
        return r


def n_seqs(req):
    return getattr(req, "batch", None) or 1


@dataclasses.dataclass
class Step:
    """What the attention function needs for one forward call (set around model calls)."""
    cfg: OscarConfig
    requests: list
    positions: list          # per request: LongTensor [T]
    prefix_lens: list        # per request: tokens already cached (decides qb in "chunk" mode)
    keep_raw: bool = False   # keep raw K/V below the packed boundary (the chunk-mode study)
    starts: list = None      # per request: its first position as an int (no device sync for the bounds)
    backend: object = None   # --attention backend: the OscarAttnBackend and this forward's fake batch
    batch: object = None
    decode: bool = False     # a decode step (forward_decode), else an extend (forward_extend)


STEP: Step | None = None


def extend(lc: LayerCache, q, k, v, pos, prefix_len, cfg: OscarConfig, scale, keep_raw, start=None):
    """Append this chunk's K/V to one layer's cache, pack its full pages, attend. q [T, Hq, D]
    (a group: [b, T, Hq, D], the cache's tensors with the same leading dim); pos: the consecutive
    positions start .. start+T-1 (start given: the bounds below need no device sync)."""
    d = q.dim() - 3  # the token dim
    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)  # the cache holds the model dtype
    lc.raw_k = k if lc.raw_k is None else torch.cat([lc.raw_k, k], d)
    lc.raw_v = v if lc.raw_v is None else torch.cat([lc.raw_v, v], d)
    T = q.shape[d]
    p0 = int(pos[0]) if start is None else start
    host_pos = torch.arange(p0, p0 + T)  # the same positions on the host, for the Python-side bounds
    end = p0 + T
    if not cfg.quantized:
        qb = torch.zeros_like(pos)
    else:
        P = cfg.page_size
        n_old, n_new = lc.n_pages, end // P
        if n_new > n_old:  # pages are packed before attention: later queries of the chunk may read them
            s, m = n_old * P - lc.raw_start, n_new - n_old
            H, D = k.shape[-2:]
            kk = lc.raw_k.narrow(d, s, m * P).reshape(-1, P, H, D)  # a group's pages packed in one call
            vv = lc.raw_v.narrow(d, s, m * P).reshape(-1, P, H, D)
            new = store_pages(kk, vv, cfg)
            if d:
                new = {f: x.view(-1, m, *x.shape[1:]) for f, x in new.items()}
            lc.pages = new if lc.pages is None else {f: torch.cat([lc.pages[f], new[f]], d) for f in new}
            if cfg.raw_first_page and lc.sink_k is None:  # page 0 was just packed: raw still starts at 0
                assert lc.raw_start == 0
                lc.sink_k, lc.sink_v = lc.raw_k.narrow(d, 0, P).clone(), lc.raw_v.narrow(d, 0, P).clone()
        qb = boundaries(pos, prefix_len, cfg)
    host_qb = boundaries(host_pos, prefix_len, cfg) if cfg.quantized else torch.zeros_like(host_pos)
    sink = (lc.sink_k, lc.sink_v) if lc.sink_k is not None else None
    outs = []
    # Blocks aligned to absolute positions: a query sees the same call shapes whether its chunk
    # started at 0 or after a cached prefix, so hit and miss differ only where the semantics do.
    cuts = [0] + list(range(BLOCK - p0 % BLOCK, T, BLOCK)) + [T]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a == b:
            continue
        qpos, qqb = pos[a:b], qb[a:b]
        lo, hi = int(host_qb[a:b].min()), p0 + b
        pages = slice_pages(lc.pages, int(host_qb[a:b].max()) // cfg.page_size, d) if cfg.quantized else None
        rk = lc.raw_k.narrow(d, lo - lc.raw_start, hi - lo)
        rv = lc.raw_v.narrow(d, lo - lc.raw_start, hi - lo)
        outs.append(attend(q.narrow(d, a, b - a), qpos, qqb, pages, rk, rv, lo, cfg, sm_scale=scale, sink=sink))
    if cfg.quantized and not keep_raw:  # the pool keeps only the partial last page raw
        cut = lc.n_pages * cfg.page_size - lc.raw_start
        if cut > 0:
            n = lc.raw_k.shape[d] - cut
            lc.raw_k, lc.raw_v = lc.raw_k.narrow(d, cut, n), lc.raw_v.narrow(d, cut, n)
            lc.raw_start += cut
    return torch.cat(outs, d)


def oscar_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, H, T, D] (post-RoPE); a
    group request takes as many consecutive rows of the batch as it has sequences."""
    st = STEP
    if st.backend is not None:
        return backend_attention(st, module.layer_idx, query, key, value, scaling)
    outs, i = [], 0
    for j, req in enumerate(st.requests):
        lc = req.layers[module.layer_idx]
        if req.batch is None:
            qkv, i = [x[i].transpose(0, 1) for x in (query, key, value)], i + 1
        else:
            qkv, i = [x[i:i + req.batch].transpose(1, 2) for x in (query, key, value)], i + req.batch
        o = extend(lc, *qkv, st.positions[j], st.prefix_lens[j], st.cfg, scaling, st.keep_raw, st.starts[j])
        outs.append(o if req.batch else o[None])
    return torch.cat(outs).to(query.dtype), None


AttentionInterface.register(ATTN, oscar_attention)


# ---- --attention backend: the serving backend over a fake pool ----------------------------------
class BackendPool:
    """SGLang's side of the oscar backend for one config: a paged pool, req_to_token rows, a page
    allocator whose pages are reference-counted (a radix hit shares its prefix's pages), and the
    detached backend. Row 0 and page 0 are never handed out (SGLang's padding row and sink page)."""

    def __init__(self, cfg, mc, device, max_requests, max_tokens):
        from sglang_oscar.backend import OscarAttnBackend, decode_kernels_usable
        P = self.P = cfg.page_size
        Hq, H, D = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
        rows, pages_per_row = max_requests + 1, -(-max_tokens // P)
        num_pages = 1 + max_requests * pages_per_row  # enough even if nothing were shared
        self.pool = fake_sglang.FakePool(mc.num_hidden_layers, num_pages, rows, P, H, D, cfg.bits,
                                         torch.bfloat16, device)
        self.req_to_token = torch.zeros((rows, pages_per_row * P), dtype=torch.int32, device=device)
        self.use_kernels = decode_kernels_usable(device, cfg, D)
        self.backend = OscarAttnBackend.detached(cfg, self.pool, self.req_to_token, device, self.use_kernels,
                                                 (Hq, H, D, torch.bfloat16))
        # SGLang's req_generation: lets the backend refuse a mid-page prefix on a row given out anew
        self.generation = self.backend.req_to_token_pool.req_generation = torch.zeros(rows, dtype=torch.int64)
        self.free_rows, self.free_pages = list(range(rows - 1, 0, -1)), list(range(num_pages - 1, 0, -1))
        self.refs = [0] * num_pages

    def take_row(self):
        if not self.free_rows:
            raise RuntimeError("fake pool: out of request rows (Study sizes it for the largest batch)")
        row = self.free_rows.pop()
        self.generation[row] += 1
        return row

    def map_pages(self, req, pages):
        """Append pool pages to a request: its next token slots are page * P + 0..P-1."""
        j, P = len(req.pages), self.P
        slots = torch.tensor(pages, dtype=torch.int32)[:, None] * P + torch.arange(P, dtype=torch.int32)
        self.req_to_token[req.row, j * P:(j + len(pages)) * P] = slots.flatten().to(self.req_to_token.device)
        for p in pages:
            self.refs[p] += 1
        req.pages += pages

    def grow(self, req, n_tokens):
        """Slots for a request's first n_tokens, allocated before the forward as SGLang does."""
        n = -(-n_tokens // self.P) - len(req.pages)
        if n > len(self.free_pages):
            raise RuntimeError("fake pool: out of pages (Study sizes it for its longest prompts)")
        if n > 0:
            self.map_pages(req, [self.free_pages.pop() for _ in range(n)])

    def release(self, req):
        for p in req.pages:
            self.refs[p] -= 1
            if self.refs[p] == 0:
                self.free_pages.append(p)
        self.free_rows.append(req.row)


class BackendRequest:
    """Request's counterpart in backend mode: a row of the pool and the pages it maps."""

    def __init__(self, bp):
        self.bp, self.row, self.pages, self.length = bp, bp.take_row(), [], 0

    def prefix(self, n_tokens, cfg):
        """A new request holding what the radix tree would give it: the first n_tokens // P whole
        pages, the same pool pages (a cache hit; nothing copied or re-packed)."""
        r = BackendRequest(self.bp)
        n = n_tokens // cfg.page_size
        if n:
            self.bp.map_pages(r, self.pages[:n])
        r.length = n * cfg.page_size
        return r

    def __del__(self):  # the study drops requests by letting go of them: free their row and pages then
        self.bp.release(self)


def backend_attention(st, layer_id, query, key, value, scaling):
    """One layer through the backend: the batch's tokens flat, request after request (SGLang's
    layout for both extend and decode), out [B, T, Hq, D]."""
    B, Hq, T, D = query.shape
    flat = lambda x: x.transpose(1, 2).reshape(B * T, -1)  # noqa: E731
    layer = fake_sglang.fake_layer(layer_id, Hq, key.shape[1], D, scaling)
    run = st.backend.forward_decode if st.decode else st.backend.forward_extend
    out = run(flat(query), flat(key).to(torch.bfloat16), flat(value).to(torch.bfloat16), layer, st.batch)
    return out.view(B, T, Hq, D).to(query.dtype), None


def _repo_relative(path) -> str:
    """A results path as recorded in a JSON: relative to the checkout, not the machine's layout."""
    root = Path(__file__).resolve().parent.parent
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return Path(path).name


# ---- running the model ------------------------------------------------------------------------
class Engine:
    def __init__(self, model_dir, device="cpu", attention="reference"):
        self.device = torch.device(device)
        self.attention = attention
        self.capacity = None   # backend mode: (most live requests, most tokens of one), set by Study
        self._pool = None      # backend mode: (cfg, BackendPool) of the config running now
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval().to(self.device)
        plain.set_attn_implementation(ATTN)
        folded = copy.deepcopy(plain)
        hd = folded.config.head_dim
        for layer in folded.model.layers:  # quarot/oscar: the cache holds H v (as the server folds it)
            fold_v_rotation(layer.self_attn.v_proj.weight.data, layer.self_attn.o_proj.weight.data, hd)
        self.models = {False: plain, True: folded}
        self.n_layers = plain.config.num_hidden_layers

    def model(self, cfg):
        return self.models[cfg.rotate]

    def backend_pool(self, cfg):
        if self._pool is None or self._pool[0] != cfg:  # one config at a time: the last one's pool goes
            self._pool = None
            self._pool = (cfg, BackendPool(cfg, self.models[False].config, self.device, *self.capacity))
        return self._pool[1]

    @torch.no_grad()
    def forward(self, cfg, reqs, ids, prefix_lens=None, keep_raw=False, hidden=False, decode=False):
        """Run token lists `ids` (one per request, equal lengths) after each request's cached tokens.
        decode: a decode step (one token per request), as SGLang schedules greedy generation."""
        global STEP
        T = len(ids[0])
        pos = [torch.arange(r.length, r.length + T, device=self.device) for r in reqs]
        assert len(ids) == sum(map(n_seqs, reqs)), "one token list per sequence"
        STEP = Step(cfg, reqs, pos, prefix_lens or [r.length for r in reqs], keep_raw,
                    starts=[r.length for r in reqs], decode=decode)
        if self.attention == "backend":
            # The backend takes the cached prefix from seq_lens - extend lengths: only the chunk
            # study's cold-prefill prefix_lens (skipped in this mode) would differ from it.
            assert not keep_raw and STEP.prefix_lens == [r.length for r in reqs] and (T == 1 or not decode)
            bp = self.backend_pool(cfg)
            for r in reqs:   # slots for the new tokens first, as SGLang allocates them before the forward
                bp.grow(r, r.length + T)
            STEP.backend = bp.backend
            STEP.batch = fake_sglang.batch([r.row for r in reqs], [r.length + T for r in reqs],
                                           None if decode else [T] * len(reqs), decode, self.device)
            bp.backend.init_forward_metadata(STEP.batch)
        try:
            m = self.model(cfg)
            seq_pos = torch.stack([p for r, p in zip(reqs, pos) for _ in range(n_seqs(r))])
            out = m.model(input_ids=torch.tensor(ids, device=self.device), position_ids=seq_pos, use_cache=False)
        finally:
            STEP = None
        for r in reqs:
            r.length += T
        h = out.last_hidden_state
        return h if hidden else m.lm_head(h[:, -1:]).float()[:, 0]

    def new(self, cfg, batch=None):
        """A request (batch=b: a group of b sequences with shared positions; reference mode only)."""
        if self.attention == "backend":
            assert batch is None, "backend mode runs one sequence per request"
            return BackendRequest(self.backend_pool(cfg))
        return Request(self.n_layers, batch)

    @torch.no_grad()
    def nll(self, cfg, ids):
        """Summed next-token NLL and count over one window, prefilled as one chunk."""
        h = self.forward(cfg, [self.new(cfg)], [ids], hidden=True)[0]
        lm = self.model(cfg).lm_head
        target = torch.tensor(ids[1:], device=self.device)
        total = 0.0
        for a in range(0, len(ids) - 1, 1024):
            b = min(len(ids) - 1, a + 1024)
            logits = lm(h[a:b]).float()
            total += torch.nn.functional.cross_entropy(logits, target[a:b], reduction="sum").item()
        return total, len(ids) - 1

    @torch.no_grad()
    def greedy(self, cfg, reqs, first_logits, n):
        """Greedy decode n tokens for a batch of prefilled requests (one token per step, incremental)."""
        toks = [[t] for t in torch.stack(list(first_logits)).argmax(-1).tolist()]  # one sync per step
        for _ in range(n - 1):
            logits = self.forward(cfg, reqs, [[t[-1]] for t in toks], decode=True)
            for t, nxt in zip(toks, logits.argmax(-1).tolist()):
                t.append(nxt)
        return toks


# ---- the workloads ------------------------------------------------------------------------------
def load_text(tok, quick):
    """Scoring windows: every document cut into consecutive windows of WINDOW tokens (a remainder of
    at least MIN_WINDOW kept), each scored from its own start."""
    docs = []
    for name in TEXT_DOCS[:2] if quick else TEXT_DOCS:
        ids = tok((TEXT_DIR / name).read_text(encoding="utf-8", errors="replace")).input_ids
        if quick:
            docs.append((name, ids[:1024]))
            continue
        for a in range(0, len(ids), WINDOW):
            w = ids[a:a + WINDOW]
            if len(w) >= MIN_WINDOW:
                docs.append((f"{name}[{a}:{a + len(w)}]", w))
    return docs


def passkey_tokens(tok, length, depth, key, filler_ids, intro, question):
    """intro + filler with the needle at `depth` (a sentence boundary) + question, ~`length` tokens;
    also returns the needle's token index (everything before it is shared between trials)."""
    needle = tok(f" The pass key is {key}. Remember it. {key} is the pass key.").input_ids
    n_fill = length - len(intro) - len(needle) - len(question)
    sent = len(filler_ids[0])
    n_sent = max(1, n_fill // sent)
    at = round(depth * n_sent)
    body = [t for s in filler_ids[:at] for t in s] + needle + [t for s in filler_ids[at:n_sent] for t in s]
    return intro + body + question, len(intro) + at * sent


def passkey_setup(tok, max_len):
    intro = tok("There is an important info hidden inside a lot of irrelevant text. Find it and "
                "memorize it. I will quiz you about the important information there.\n").input_ids
    sentence = tok(" The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                   "back again.").input_ids
    question = tok("\nWhat is the pass key? The pass key is").input_ids
    filler = [sentence] * (max_len // len(sentence) + 1)
    return intro, filler, question


CHAT_TASKS = ["Summarize the passage above in two sentences.", "What is the main topic of this text?",
              "List three obligations that this text describes.", "Explain the passage above to a child.",
              "Which rights does this text give to the reader?", "Write one question a lawyer might ask about this."]


def chat_prompts(tok, docs_text, n, excerpt_tokens):
    """n chat prompts, each a passage from the text plus a task (long enough to fill packed pages)."""
    tasks = CHAT_TASKS
    rng = random.Random(0)
    out = []
    for i in range(n):
        name, ids = docs_text[i % len(docs_text)]
        start = rng.randrange(0, max(1, len(ids) - excerpt_tokens))
        passage = tok.decode(ids[start:start + excerpt_tokens])
        msg = f"Read this passage:\n\n{passage}\n\n{tasks[i % len(tasks)]}"
        text = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                       add_generation_prompt=True)
        out.append(tok(text).input_ids)
    return out


def chat_prompts_equal(tok, docs_text, n, length):
    """chat_prompts' passages and tasks as n prompts of exactly `length` tokens, so that they run as
    one batch: the passage is cut in token space to fill what the template and the task leave."""
    mark = "\x00PASSAGE\x00"
    rng = random.Random(0)
    out = []
    for i in range(n):
        name, ids = docs_text[i % len(docs_text)]
        msg = f"Read this passage:\n\n{mark}\n\n{CHAT_TASKS[i % len(CHAT_TASKS)]}"
        pre, post = tok.apply_chat_template([{"role": "user", "content": msg}], tokenize=False,
                                            add_generation_prompt=True).split(mark)
        head, tail = tok(pre).input_ids, tok(post, add_special_tokens=False).input_ids
        n_pass = length - len(head) - len(tail)
        start = rng.randrange(0, max(1, len(ids) - n_pass))
        out.append(head + ids[start:start + n_pass] + tail)
        assert len(out[-1]) == length, "document too short for the prompt length"
    return out


def write_json(path, obj):
    """Rewrite a result file atomically (a run stopped mid-write leaves the previous one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def reference_hardware(device):
    """The JSON's hardware line of a reference-attention run."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 weights, reference (torch) " \
               "attention and quantization"
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), torch " \
           f"{torch.__version__}, bf16 weights, reference (torch) kernels"


# ---- the study ----------------------------------------------------------------------------------
def row_key(method, bits, page):
    """A row's name for --rows: oscar-2-64 (method-bits-page), bf16-64."""
    return f"bf16-{page}" if method == "bf16" else f"{method}-{bits}-{page}"


def main_cfg(method, bits, page_size):
    """A row of the 20-trial study (accuracy.json): measured in page prefill, the default when it ran
    (the powered sweep, accuracy_sweep.json, compares the prefill modes)."""
    return OscarConfig(method=method, bits=bits, page_size=page_size, prefill="page")


def select_rows(spec, backend):
    """--rows NAME,NAME (row_key names) -> their configs in MAIN_ROWS order; None: the whole study."""
    if spec is None:
        return None
    names = {row_key(*r): r for r in MAIN_ROWS}
    want = {"bf16-64" if n.strip() == "bf16" else n.strip() for n in spec.split(",") if n.strip()}
    if not want or want - names.keys():
        raise SystemExit(f"unknown rows {sorted(want - names.keys())}; rows: {', '.join(names)}")
    if backend and "bf16-64" in want:
        raise SystemExit("--attention backend: bf16 has no oscar backend (plain SGLang serves it)")
    return [main_cfg(m, b, p) for m, b, p in MAIN_ROWS if row_key(m, b, p) in want]


class Study:
    def __init__(self, args):
        self.args = args
        backend = args.attention == "backend"
        if backend and args.plan:
            raise SystemExit("--plan is for the reference study; --attention backend runs --rows")
        self.eng = Engine(args.model or default_model_path(), args.device, args.attention)
        self.rows = select_rows(args.rows or (BACKEND_ROWS if backend else None), backend)
        tok = self.eng.tok
        self.docs = load_text(tok, args.quick)
        self.lengths = [1024, 2048] if args.quick else [int(x) for x in args.lengths.split(",")]
        self.trials = 3 if args.quick else args.trials or 20
        self.n_prompts = 4 if args.quick else args.prompts
        self.gen = 16 if args.quick else 64
        self.prompts = chat_prompts(tok, self.docs, self.n_prompts, 256 if args.quick else 640)
        self.intro, self.filler, self.question = passkey_setup(tok, max(self.lengths))
        # backend mode sizes its fake pool from these: the agreement batch holds every chat prompt at
        # once (a passkey run: its base, a trial and the trial being let go), and the longest sequence
        # is a window, the passkey base prompt, a passkey prompt or a chat prompt with their answers
        self.eng.capacity = (self.n_prompts + 3, max(
            max(len(i) for _, i in self.docs), len(self.intro) + sum(map(len, self.filler)),
            max(self.lengths) + 8, max(map(len, self.prompts)) + self.gen))
        rng = random.Random(1)
        self.keys = {L: [rng.randrange(10000, 100000) for _ in range(self.trials)] for L in self.lengths}
        self.bf16_answers = None
        self.result = {
            "model": MODEL_NAME, "hardware": reference_hardware(self.eng.device),
            "text_source": {"package": "base-files (Debian), /usr/share/common-licenses",
                            "documents": {n: len(ids) for n, ids in self.docs}, "window": WINDOW,
                            "tokens_scored": sum(len(i) - 1 for _, i in self.docs)},
            "passkey": {"lengths": self.lengths, "trials": self.trials,
                        "depths": "evenly spaced over 0..1", "generated_tokens": 8},
            "agreement": {"prompts": self.n_prompts, "generated_tokens": self.gen,
                          "metric": "fraction of identical tokens (position by position) vs bf16"},
            "quick": bool(args.quick), "rows": [], "prefill_study": {}}
        self.t0 = time.time()
        # a smoke run never overwrites the committed results
        default = Path(tempfile.gettempdir()) / "sglang_oscar_accuracy_quick.json" if args.quick \
            else RESULTS / "accuracy.json"
        if backend:
            from sglang_oscar.backend import decode_kernels_usable
            hd = self.eng.models[False].config.head_dim
            self.kernels = all(decode_kernels_usable(self.eng.device, c, hd) for c in self.rows)
            default = Path(tempfile.gettempdir()) / "sglang_oscar_accuracy_backend_quick.json" if args.quick \
                else RESULTS / f"accuracy_{'kernels' if self.kernels else 'backend'}_{device_tag(self.eng.device)}.json"
        self.path = Path(args.out) if args.out else default
        if args.resume and self.path.exists():  # continue an interrupted run where it stopped
            old = json.loads(self.path.read_text())
            self.result["rows"], self.result["prefill_study"] = old["rows"], old["prefill_study"]
            self.bf16_answers = old["agreement"].get("bf16_tokens")
            self.result["agreement"].update(old["agreement"])
            self.result["elapsed_before_resume_s"] = old.get("elapsed_s", 0) + old.get("elapsed_before_resume_s", 0)
        if backend:
            self.setup_backend()
        self.result["complete"] = False

    def setup_backend(self):
        """Backend mode: the JSON says how attention ran, and the reference run it is compared with
        (the same rows through reference.attend) is loaded; its bf16 answers score this run's
        agreement, exactly as they scored the reference rows'."""
        args, res = self.args, self.result
        where = torch.cuda.get_device_name(self.eng.device) if self.eng.device.type == "cuda" else \
            f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        how = "CUDA kernels" if self.kernels else "batched torch path"
        res["hardware"] = f"{where}, torch {torch.__version__}, bf16 weights, attention through the oscar " \
                          f"backend ({how})"
        res["attention"] = "backend"
        res["prefill_study"] = {"skipped": "not run in backend mode (only the main rows' ppl, passkey, agreement)"}
        quick_ref = Path(tempfile.gettempdir()) / "sglang_oscar_accuracy_quick.json"  # what --quick writes
        ref_path = Path(args.compare_to) if args.compare_to else quick_ref if args.quick else RESULTS / "accuracy.json"
        names = ",".join(row_key(c.method, c.bits, c.page_size) for c in self.rows)
        redo = f"run python bench/accuracy.py{' --quick' if args.quick else ''} --rows {names} first, or name a " \
               "reference run of the same settings with --compare-to"
        if not ref_path.exists():
            raise SystemExit(f"no reference run at {ref_path}: {redo}")
        ref = json.loads(ref_path.read_text())
        self.ref_rows = {(r["method"], r["bits"], r["page_size"]): r for r in ref["rows"]}
        bf16 = ref["agreement"].get("bf16_tokens") or []
        problems = [what for what, bad in [
            ("--quick", bool(ref.get("quick")) != bool(args.quick)),
            ("the scored documents", ref["text_source"]["documents"] != res["text_source"]["documents"]),
            ("bf16 answers for these prompts", ref["agreement"]["generated_tokens"] != self.gen
             or len(bf16) < self.n_prompts)]
            if bad] + [f"row {row_key(c.method, c.bits, c.page_size)}" for c in self.rows
                       if "ppl" not in self.ref_rows.get((c.method, c.bits, c.page_size), {})]
        if problems:
            raise SystemExit(f"reference run {ref_path} does not match this run ({', '.join(problems)}): {redo}")
        self.bf16_answers = bf16[:self.n_prompts]  # chat_prompts' first n prompts are the same for any n
        like = (ref["passkey"]["lengths"], ref["passkey"]["trials"], ref["agreement"]["prompts"]) == \
            (self.lengths, self.trials, self.n_prompts)
        ref_name = _repo_relative(ref_path)
        res["compared_to"] = {"json": ref_name, "hardware": ref["hardware"], "like_for_like": like,
                              "diff": "this run minus the reference row"}
        res["agreement"]["bf16_tokens_from"] = ref_name
        if not like:
            self.log("note: passkey lengths/trials or prompts differ from the reference run: not like for like")

    def update_comparison(self):
        """Backend mode: next to each row's metrics the reference row's and the difference, and
        whether every perplexity is within PPL_TOLERANCE of its reference."""
        rows = self.result["rows"]
        for r in rows:
            ref = self.ref_rows[(r["method"], r["bits"], r["page_size"])]
            r["reference"] = {k: ref[k] for k in ("ppl", "agreement", "passkey") if k in ref}
            d = {k: r[k] - ref[k] for k in ("ppl", "agreement") if k in r and k in ref}
            pk = {L: v - ref["passkey"][L] for L, v in r.get("passkey", {}).items() if L in ref.get("passkey", {})}
            if pk:
                d["passkey"] = pk
            r["diff"] = d
        diffs = [abs(r["diff"]["ppl"]) for r in rows if "ppl" in r["diff"]]
        self.result["ppl_goal"] = {"tolerance": PPL_TOLERANCE, "max_abs_diff": max(diffs, default=None),
                                   "met": len(diffs) == len(self.rows) and max(diffs) <= PPL_TOLERANCE}

    def log(self, msg):
        print(f"[{time.time() - self.t0:7.0f}s] {msg}", flush=True)

    def save(self):
        path = self.path
        self.result["elapsed_s"] = round(time.time() - self.t0)
        if self.eng.attention == "backend":
            self.update_comparison()
        write_json(path, self.result)
        if self.eng.attention != "backend":  # the plot's Δppl is over a bf16 row, which backend runs lack
            plot(self.result, path.with_suffix(".png"))

    def row(self, cfg):
        for r in self.result["rows"]:
            if (r["method"], r["bits"], r["page_size"]) == (cfg.method, cfg.bits if cfg.quantized else 16,
                                                             cfg.page_size):
                return r
        r = {"method": cfg.method, "bits": cfg.bits if cfg.quantized else 16, "page_size": cfg.page_size,
             "name": cfg.name + ("" if cfg.page_size == 64 else f"/p{cfg.page_size}")}
        self.result["rows"].append(r)
        return r

    def ppl(self, cfg):
        tot, n = 0.0, 0
        for name, ids in self.docs:
            s, c = self.eng.nll(cfg, ids)
            tot, n = tot + s, n + c
        return math.exp(tot / n)

    def passkey(self, cfg, keep_raw=False, acc=None):
        """Accuracy per length. Trials share the filler before their needle: one base run per
        config, each trial resumes from its needle's page (page mode: the packed prefix is exactly
        what a cold run stores). keep_raw: the chunk study's cold single-chunk prefill, where the
        whole prompt attends in bf16 (qb = 0) and only decode reads the packed pages.
        acc: the result dict, filled in place and saved length by length (lengths already in it
        are skipped, so an interrupted run loses at most one length)."""
        eng = self.eng
        acc = {} if acc is None else acc
        todo = [L for L in self.lengths if str(L) not in acc]
        if not todo:
            return acc
        base = eng.new(cfg)
        eng.forward(cfg, [base], [self.intro + [t for s in self.filler for t in s]][:1],
                    prefix_lens=[0], keep_raw=keep_raw)
        for L in todo:
            hits = 0
            for j, key in enumerate(self.keys[L]):
                depth = j / max(1, self.trials - 1)
                ids, shared = passkey_tokens(eng.tok, L, depth, key, self.filler, self.intro, self.question)
                req = base.prefix(shared, cfg) if not keep_raw else self._raw_prefix(base, shared, cfg)
                logits = eng.forward(cfg, [req], [ids[req.length:]],
                                     prefix_lens=[0 if keep_raw else req.length], keep_raw=keep_raw)
                if keep_raw:
                    self._drop_raw(req, cfg)
                out = eng.greedy(cfg, [req], logits, 8)[0]
                hits += str(key) in eng.tok.decode(out)
            acc[str(L)] = hits / self.trials
            self.log(f"  {cfg.name}/p{cfg.page_size}/{cfg.prefill} passkey {L}: {acc[str(L)]:.2f}")
            self.save()
        return acc

    @staticmethod
    def _raw_prefix(base, n, cfg):
        """Chunk study: the first n tokens with their raw K/V (a cold prefill sees them in bf16)."""
        r = Request(0)
        P = cfg.page_size
        for lc in base.layers:
            r.layers.append(LayerCache(slice_pages(lc.pages, n // P), lc.raw_k[:n], lc.raw_v[:n], 0))
        r.length = n
        return r

    @staticmethod
    def _drop_raw(req, cfg):
        """After the prefill the pool keeps only the partial last page raw."""
        for lc in req.layers:
            cut = lc.n_pages * cfg.page_size - lc.raw_start
            lc.raw_k, lc.raw_v, lc.raw_start = lc.raw_k[cut:], lc.raw_v[cut:], lc.raw_start + cut

    def cached_half(self, cfg, ids):
        """A request holding what the radix tree keeps of the first half of ids: whole pages."""
        half = (len(ids) // 2) // cfg.page_size * cfg.page_size
        req = self.eng.new(cfg)
        self.eng.forward(cfg, [req], [ids[:half]], prefix_lens=[0])
        return req.prefix(half, cfg)

    def generate(self, cfg, prompts, hit=False):
        """Greedy continuations of chat prompts, batched. hit: the first half of each prompt is a
        cached prefix (whole pages, as the radix tree holds them) and the rest extends it."""
        eng = self.eng
        reqs, first = [], []
        for ids in prompts:
            req = self.cached_half(cfg, ids) if hit else eng.new(cfg)
            logits = eng.forward(cfg, [req], [ids[req.length:]], prefix_lens=[req.length])
            reqs.append(req)
            first.append(logits[0])
        return eng.greedy(cfg, reqs, first, self.gen)

    @torch.no_grad()
    def hit_miss_gap(self, cfg):
        """Teacher-forced: how much a cache hit moves the scores. For each chat prompt, the log-prob of
        every token of its second half, cold vs with its first half (whole pages) cached; returns the
        mean and max |difference| over all those tokens (nats)."""
        eng = self.eng
        lm = eng.model(cfg).lm_head
        gaps = []
        for ids in self.prompts:
            req = self.cached_half(cfg, ids)
            half = req.length
            target = torch.tensor(ids[half + 1:], device=eng.device)[:, None]
            cold = eng.forward(cfg, [eng.new(cfg)], [ids], prefix_lens=[0], hidden=True)[0][half:-1]
            hot = eng.forward(cfg, [req], [ids[half:]], prefix_lens=[half], hidden=True)[0][:-1]
            lp = [torch.log_softmax(lm(h).float(), -1).gather(1, target)[:, 0] for h in (cold, hot)]
            gaps.append((lp[0] - lp[1]).abs())
        g = torch.cat(gaps)
        return {"mean": float(g.mean()), "max": float(g.max()), "tokens": int(g.numel())}

    @staticmethod
    def compare(answers, reference):
        """(fraction of identical tokens position by position, fraction of identical answers)."""
        same = sum(a == b for x, y in zip(answers, reference) for a, b in zip(x, y))
        return same / sum(len(x) for x in reference), sum(x == y for x, y in zip(answers, reference)) / len(reference)

    def agreement(self, answers):
        return self.compare(answers, self.bf16_answers)[0]

    def ppl_and_agreement(self, cfg):
        r = self.row(cfg)
        if "agreement" in r:
            return
        t = time.time()
        r["ppl"] = self.ppl(cfg)
        self.log(f"{r['name']}: ppl {r['ppl']:.4f}")
        answers = self.generate(cfg, self.prompts)
        if self.bf16_answers is None:  # bf16 runs first: the reference for every other row
            self.bf16_answers = answers
            self.result["agreement"]["bf16_tokens"] = answers
            self.result["agreement"]["bf16_sample"] = self.eng.tok.decode(answers[0])
        r["agreement"] = self.agreement(answers)
        r.setdefault("seconds", {})["ppl_and_agreement"] = round(time.time() - t, 1)
        self.log(f"{r['name']}: agreement {r['agreement']:.4f}")
        self.save()

    def run(self):
        if self.rows is not None:
            return self.run_rows(self.rows)
        rows = MAIN_ROWS[:4] if self.args.quick else MAIN_ROWS
        cfgs = [main_cfg(m, b, p) for m, b, p in rows]
        if self.args.plan:
            return self.run_plan(cfgs)
        head, rest = cfgs[:4], cfgs[4:]  # bf16, kivi-2, quarot-2, oscar-2: the headline comparison first
        # Cheapest pieces first, so an interrupted run (continued with --resume) has the most rows.
        for cfg in head:
            self.ppl_and_agreement(cfg)
        self.passkeys([head[0], head[3], head[1], head[2]])  # bf16 and oscar-2 first: the goal compares them
        for cfg in rest:
            self.ppl_and_agreement(cfg)
        self.prefill_study(with_passkey=False)
        self.passkeys(rest)
        self.prefill_study(with_passkey=True)
        self.result["complete"] = True
        self.save()
        self.log("done")

    def run_plan(self, cfgs):
        """Only the pieces named in --plan, in that order (several processes can share a study:
        each writes its own JSON, merged afterwards with --merge)."""
        by_name = {self.row(c)["name"]: c for c in cfgs}
        for piece in self.args.plan.split(","):
            kind, _, name = piece.partition(":")
            if kind == "ppl":
                self.ppl_and_agreement(by_name[name])
            elif kind == "passkey":
                self.passkeys([by_name[name]])
            elif kind in ("study", "study-passkey"):
                self.prefill_study(with_passkey=kind == "study-passkey")
            else:
                raise SystemExit(f"unknown piece {piece!r}")
        self.log("plan done")

    def run_rows(self, cfgs):
        """Only these rows (--rows; backend mode always): ppl and agreement, then passkeys; bf16's
        answers first where no run gave them yet (every row's agreement is measured against them)."""
        self.log(f"{self.result['hardware']} -> {self.path}")
        if self.eng.attention == "backend":
            self.log("prefill study skipped: backend mode runs only the main rows (ppl, passkey, agreement)")
        if self.bf16_answers is None and cfgs[0].quantized:
            self.ppl_and_agreement(OscarConfig(method="bf16"))
        for cfg in cfgs:
            self.ppl_and_agreement(cfg)
        self.passkeys(cfgs)
        self.result["complete"] = True
        self.save()
        self.log("done")

    def passkeys(self, cfgs):
        for cfg in cfgs:
            r, t = self.row(cfg), time.time()
            self.passkey(cfg, acc=r.setdefault("passkey", {}))
            sec = r.setdefault("seconds", {})
            sec["passkey"] = round(sec.get("passkey", 0) + time.time() - t, 1)

    def prefill_study(self, with_passkey=True):
        st = self.result["prefill_study"]
        main = self.row(main_cfg("oscar", 2, 64))  # the study's oscar-2 row: page prefill
        ctl = st.setdefault("bf16_control", {})
        if "hit_vs_miss_agreement" not in ctl and self.bf16_answers is not None:
            # Unquantized, a hit differs from a miss only in how the prefix's forward is batched:
            # what this control loses is the arithmetic's batch variance, not quantization's.
            hit = self.generate(OscarConfig(method="bf16"), self.prompts, hit=True)
            ctl["hit_vs_miss_agreement"], ctl["hit_vs_miss_identical_prompts"] = self.compare(hit, self.bf16_answers)
            self.log(f"bf16 control: hit vs miss {ctl['hit_vs_miss_agreement']:.4f}")
            self.save()
        if "hit_vs_miss_logprob_gap" not in ctl:
            ctl["hit_vs_miss_logprob_gap"] = self.hit_miss_gap(OscarConfig(method="bf16"))
            self.save()
        for prefill in ("page", "chunk"):
            cfg = OscarConfig(method="oscar", bits=2, page_size=64, prefill=prefill)
            d = st.setdefault(prefill, {})
            if "hit_vs_miss_logprob_gap" not in d:
                d["hit_vs_miss_logprob_gap"] = self.hit_miss_gap(cfg)
                self.log(f"prefill={prefill}: hit vs miss log-prob gap {d['hit_vs_miss_logprob_gap']}")
                self.save()
            if "hit_vs_miss_agreement" in d:
                continue
            cold = self.generate(cfg, self.prompts)
            d["agreement"] = self.agreement(cold)
            if prefill == "page" and "agreement" in main:  # the same computation as the main row
                assert abs(d["agreement"] - main["agreement"]) < 1e-12
            hit = self.generate(cfg, self.prompts, hit=True)
            d["hit_vs_miss_agreement"], d["hit_vs_miss_identical_prompts"] = self.compare(hit, cold)
            self.log(f"prefill={prefill}: agreement {d['agreement']:.4f}, hit vs miss "
                     f"{d['hit_vs_miss_agreement']:.4f}")
            self.save()
        st["page"]["passkey"] = main.get("passkey")  # the main oscar-2 row is the page-mode run
        if with_passkey:
            cfg = OscarConfig(method="oscar", bits=2, page_size=64, prefill="chunk")
            self.passkey(cfg, keep_raw=True, acc=st["chunk"].setdefault("passkey", {}))
        st["note"] = ("page: every query reads earlier pages packed and its own page in bf16 (prefill as "
                      "decode); chunk: a cold single-chunk prefill attends in bf16 throughout and only "
                      "decode reads packed pages; hit vs miss: the first half of each prompt (whole "
                      "pages) cached, then the rest extended, against the cold run (greedy agreement of the "
                      "continuation; logprob_gap: teacher-forced |log p| difference on the prompt's second "
                      "half, nats); bf16_control: the same hit vs miss without quantization")


# ---- the powered sweep (--sweep) ------------------------------------------------------------------
# Warm splits are multiples of the largest page size, so every design point caches the same tokens.
SPLIT = 256
# The capacity a user pays, counted as the GPU serving study counts it: SGLang's token count at an
# 8 GiB KV budget with 128 request slots, Llama-3.1-8B shape (32 layers, 8 KV heads, head_dim 128).
SERVING_SHAPE = {"layers": 32, "kv_heads": 8, "head_dim": 128, "budget_gib": 8, "slots": 128}


class OutOfBudget(Exception):
    pass


def point_name(cfg):
    """A design point's name: bf16, kivi-2/p64/page, oscar-2/p128/chunk/sink/head-norm."""
    if not cfg.quantized:
        return "bf16"
    parts = [cfg.name, f"p{cfg.page_size}", cfg.prefill] + ["sink"] * cfg.raw_first_page
    return "/".join(parts + ["head-norm"] * (cfg.key_norm == "head"))


def sweep_points():
    """Every design point, most informative first: the controls and the default, then one factor
    changed at a time, the 4-bit and QuaRot controls, then the rest of the grid by how many factors
    differ from the default (chunk-prefill combinations first among equals)."""
    base, rep = OscarConfig(), dataclasses.replace
    first = [OscarConfig(method="bf16"), OscarConfig(method="kivi"), base]
    other = {"page": "chunk", "chunk": "page"}[base.prefill]
    singles = [rep(base, prefill=other), rep(base, page_size=128), rep(base, raw_first_page=True),
               rep(base, key_norm="head"), rep(base, page_size=256)]
    controls = [OscarConfig(bits=4), OscarConfig(method="quarot")]
    grid = [OscarConfig(page_size=P, prefill=pf, raw_first_page=sink, key_norm=norm) for pf in ("chunk", "page")
            for P in (64, 128, 256) for sink in (False, True) for norm in ("omni", "head")]
    changed = lambda c: (c.prefill != base.prefill) + (c.page_size != base.page_size) + \
        (c.raw_first_page != base.raw_first_page) + (c.key_norm != base.key_norm)  # noqa: E731
    rest = sorted((c for c in grid if c not in first + singles), key=changed)
    return first + singles + controls + rest


def capacity(cfg, kv_heads, head_dim, layers, budget_gib, slots):
    """Bytes per token per layer and the token capacity at a fixed KV budget, against bf16. The fixed
    cost is the raw bf16 pages the pool reserves per request slot: its partial last page, and with a
    raw first page one more (modelled as a second reserved page per slot)."""
    bf16 = 2 * kv_heads * head_dim * 2
    if not cfg.quantized:
        return {"bytes_per_token_layer": bf16, "per_token_ratio": 1.0, "capacity_ratio": 1.0}
    q = layout.bytes_per_token(kv_heads, head_dim, cfg.bits) + 4 * (kv_heads - 1) * (cfg.key_norm == "head")
    budget = budget_gib * (1 << 30)
    fixed = slots * (1 + cfg.raw_first_page) * cfg.page_size * bf16 * layers
    return {"bytes_per_token_layer": q, "per_token_ratio": round(bf16 / q, 3),
            "capacity_ratio": round((budget - fixed) / (q * layers) / (budget / (bf16 * layers)), 3)}


def binomial(hits):
    p = sum(hits) / len(hits)
    return p, math.sqrt(p * (1 - p) / len(hits))


def mean_se(xs):
    """Mean and standard error over independent units (prompts: a prompt's tokens are not independent,
    every token after a divergence differs)."""
    m = sum(xs) / len(xs)
    var = sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def per_prompt_agreement(answers, reference):
    return [sum(a == b for a, b in zip(x, y)) / len(y) for x, y in zip(answers, reference)]


class Sweep:
    """The powered study: every design point through the same harness, cold and warm, in priority order.

    cold: the whole prompt in one request (one prefill chunk). warm: the document in an earlier
    request, whose whole pages the radix tree keeps (packed as the pool packs them, computed in that
    request's own forward), then the question in a later request that extends them. Each piece
    (a point's perplexity, its agreement, its passkey at one length) is saved when it finishes;
    --budget-s stops before a piece that would not finish in time."""

    def __init__(self, args):
        self.t0 = time.time()  # the budget counts the model load too
        self.args = args
        if args.attention == "backend":
            raise SystemExit("--sweep runs the reference attention (its design points have no kernels)")
        if args.plan or args.rows:
            raise SystemExit("--sweep takes --points, not --plan or --rows")
        self.eng = eng = Engine(args.model or default_model_path(), args.device)
        tok, quick = eng.tok, args.quick
        self.docs = load_text(tok, quick)
        self.lengths = [512, 1024] if quick else [int(x) for x in args.lengths.split(",")]
        self.trials = args.trials or (4 if quick else 60)
        self.gen = 8 if quick else 64
        self.prompts = chat_prompts_equal(tok, self.docs, 4 if quick else args.prompts, 320 if quick else 700)
        self.intro, self.filler, self.question = passkey_setup(tok, max(self.lengths))
        rng = random.Random(1)
        self.keys = {L: [rng.randrange(10000, 100000) for _ in range(self.trials)] for L in self.lengths}
        points = sweep_points()
        if args.points:
            names = {point_name(c): c for c in points}
            want = [n.strip() for n in args.points.split(",") if n.strip()]
            if set(want) - names.keys():
                raise SystemExit(f"unknown points {sorted(set(want) - names.keys())}; points: {', '.join(names)}")
            points = [names[n] for n in want]
        elif quick:
            points = points[:4]
        self.points = points
        cut = (len(self.prompts[0]) - 32) // SPLIT * SPLIT
        self.result = {
            "model": MODEL_NAME, "hardware": reference_hardware(eng.device), "sweep": True,
            "text_source": {"package": "base-files (Debian), /usr/share/common-licenses",
                            "documents": {n: len(ids) for n, ids in self.docs}, "window": WINDOW,
                            "tokens_scored": sum(len(i) - 1 for _, i in self.docs)},
            "ppl": {"cold": "each window prefilled as one chunk, every token scored",
                    "warm": f"each window's first half (a multiple of {SPLIT} tokens) cached, the rest "
                            "extended and scored; cold_second_half: the same tokens scored cold"},
            "passkey": {"lengths": self.lengths, "trials": self.trials, "generated_tokens": 8,
                        "depths": "trial j of n at depth j / (n - 1)",
                        "cold": "the whole prompt in one request",
                        "warm": "the document (everything before the question) in an earlier request, "
                                "its whole pages cached; the question extends them",
                        "se": "binomial standard error sqrt(p (1 - p) / n)"},
            "agreement": {"prompts": len(self.prompts), "prompt_tokens": len(self.prompts[0]),
                          "generated_tokens": self.gen, "warm_cached_tokens": cut,
                          "metric": "fraction of identical tokens (position by position) vs bf16 cold; "
                                    "se over prompts; cold_vs_warm: this point's warm answers vs its cold ones"},
            "capacity_model": {**SERVING_SHAPE, "note": capacity.__doc__.split(". ", 1)[1].strip()},
            "radix_granularity": "tokens per shared unit: the page size (plain SGLang bf16: 1)",
            "batch_tokens": args.batch_tokens, "budget_s": args.budget_s, "quick": bool(quick),
            "order": [point_name(c) for c in points], "rows": []}
        default = Path(tempfile.gettempdir()) / "sglang_oscar_accuracy_sweep_quick.json" if quick \
            else RESULTS / "accuracy_sweep.json"
        self.path = Path(args.out) if args.out else default
        if args.resume and self.path.exists():
            old = json.loads(self.path.read_text())
            self.result["rows"] = old["rows"]
            self.result["agreement"]["bf16_tokens"] = old["agreement"].get("bf16_tokens")
            self.result["elapsed_before_resume_s"] = old.get("elapsed_s", 0) + old.get("elapsed_before_resume_s", 0)
        # a piece's time estimate: the longest that kind took so far (a resumed run starts from the JSON's)
        self.est = {}
        for r in self.result["rows"]:
            for k, v in r.get("seconds", {}).items():
                self.est[k] = max(self.est.get(k, 0), v)
        self.result["complete"] = False

    log = Study.log

    def save(self):
        self.result["elapsed_s"] = round(time.time() - self.t0)
        write_json(self.path, self.result)

    def row(self, cfg):
        name = point_name(cfg)
        for r in self.result["rows"]:
            if r["name"] == name:
                return r
        hd = self.eng.models[False].config
        r = {"name": name, "method": cfg.method, "bits": cfg.bits if cfg.quantized else 16,
             "page_size": cfg.page_size, "prefill": cfg.prefill, "raw_first_page": cfg.raw_first_page,
             "key_norm": cfg.key_norm, "radix_granularity": cfg.page_size if cfg.quantized else 1,
             "capacity": capacity(cfg, **SERVING_SHAPE),
             "per_token_ratio_this_model": capacity(cfg, hd.num_key_value_heads, hd.head_dim, hd.num_hidden_layers,
                                                    1, 0)["per_token_ratio"]}
        self.result["rows"].append(r)
        return r

    def run(self):
        self.log(f"{self.result['hardware']} -> {self.path}; {len(self.points)} points")
        try:
            for cfg in self.points:
                r = self.row(cfg)
                self.piece(r, "ppl", lambda: self.ppl(cfg, r))
                self.piece(r, "agreement", lambda: self.agreement(cfg, r))
                for L in self.lengths:
                    self.piece(r, f"passkey-{L}", lambda: self.passkey(cfg, r, L))
            self.result["complete"] = True
            self.log("done")
        except OutOfBudget as e:
            self.result["stopped"] = str(e)
            self.log(f"stopped: {e}")
        finally:  # also on SIGTERM (main turns it into SystemExit): what finished is written and drawn
            self.save()
            draw(self.result, self.path)
            print(sweep_table(self.result))

    def piece(self, r, kind, fn):
        sec = r.setdefault("seconds", {})
        if kind in sec:
            return
        est = self.est.get(kind, 0)
        left = self.args.budget_s - (time.time() - self.t0) if self.args.budget_s else math.inf
        if left <= 0 or est > left:
            raise OutOfBudget(f"{r['name']} {kind}: about {est:.0f} s needed, {max(0, left):.0f} s of the budget left")
        t = time.time()
        fn()
        sec[kind] = round(time.time() - t, 1)
        self.est[kind] = max(est, sec[kind])
        self.log(f"{r['name']} {kind} ({sec[kind]} s)")
        self.save()

    def groups(self, seqs):
        """Indices of equal-length sequences in batches of at most --batch-tokens tokens."""
        by = {}
        for i, x in enumerate(seqs):
            by.setdefault(len(x), []).append(i)
        for n, idx in by.items():
            b = max(1, self.args.batch_tokens // n)
            for a in range(0, len(idx), b):
                yield idx[a:a + b]

    def cached(self, cfg, ids, n):
        """A group request holding what the radix tree keeps after an earlier request sent the first
        n tokens of each sequence: their whole pages, computed in that request's own forward."""
        doc = self.eng.new(cfg, len(ids))
        self.eng.forward(cfg, [doc], [x[:n] for x in ids])
        return doc.prefix(n, cfg)

    @torch.no_grad()
    def ppl(self, cfg, r):
        eng = self.eng
        lm = eng.model(cfg).lm_head
        seqs = [ids for _, ids in self.docs]
        tot = {"cold": [0.0, 0], "cold_second_half": [0.0, 0], "warm": [0.0, 0]}

        def add(key, h, target):  # summed on the device: no sync until the end
            h, target = h.flatten(0, 1), target.flatten()
            for a in range(0, len(target), 2048):  # bounds the logits tensor
                tot[key][0] += torch.nn.functional.cross_entropy(lm(h[a:a + 2048]).float(), target[a:a + 2048],
                                                                 reduction="sum").double()
            tot[key][1] += len(target)
        for idx in self.groups(seqs):
            ids = [seqs[i] for i in idx]
            half = len(ids[0]) // 2 // SPLIT * SPLIT
            target = torch.tensor(ids, device=eng.device)[:, 1:]
            h = eng.forward(cfg, [eng.new(cfg, len(ids))], ids, hidden=True)
            add("cold", h[:, :-1], target)
            add("cold_second_half", h[:, half:-1], target[:, half:])
            del h
            req = self.cached(cfg, ids, half)
            add("warm", eng.forward(cfg, [req], [x[half:] for x in ids], hidden=True)[:, :-1], target[:, half:])
        r["ppl"], r["ppl_cold_second_half"], r["ppl_warm"] = (math.exp(float(tot[k][0]) / tot[k][1]) for k in
                                                              ("cold", "cold_second_half", "warm"))
        bf16 = next((x for x in self.result["rows"] if x["method"] == "bf16" and "ppl" in x), None)
        if bf16 is not None:
            r["dppl"] = r["ppl"] - bf16["ppl"]
            r["dppl_warm"] = r["ppl_warm"] - bf16["ppl_warm"]

    def generate(self, cfg, warm):
        """Greedy answers to the chat prompts (one group); warm: all but the last 32+ tokens cached."""
        eng, out = self.eng, [None] * len(self.prompts)
        for idx in self.groups(self.prompts):
            ids = [self.prompts[i] for i in idx]
            req = self.cached(cfg, ids, self.result["agreement"]["warm_cached_tokens"]) if warm \
                else eng.new(cfg, len(ids))
            logits = eng.forward(cfg, [req], [x[req.length:] for x in ids])
            for i, a in zip(idx, eng.greedy(cfg, [req], logits, self.gen)):
                out[i] = a
        return out

    def agreement(self, cfg, r):
        ag = self.result["agreement"]
        cold, warm = self.generate(cfg, False), self.generate(cfg, True)
        if not cfg.quantized and not ag.get("bf16_tokens"):
            ag["bf16_tokens"] = cold
        if not ag.get("bf16_tokens"):
            raise SystemExit("the agreement needs bf16's answers: run the bf16 point first "
                             "(or --resume a run that has them)")
        for key, answers, ref in (("agreement", cold, ag["bf16_tokens"]), ("agreement_warm", warm, ag["bf16_tokens"]),
                                  ("cold_vs_warm", warm, cold)):
            r[key], r[key + "_se"] = mean_se(per_prompt_agreement(answers, ref))
        r["cold_vs_warm_identical"] = sum(a == b for a, b in zip(warm, cold)) / len(cold)

    @torch.no_grad()
    def passkey(self, cfg, r, L):
        eng = self.eng
        n = self.trials
        prompts = [passkey_tokens(eng.tok, L, j / max(1, n - 1), key, self.filler, self.intro, self.question)[0]
                   for j, key in enumerate(self.keys[L])]
        hits = {"cold": [0] * n, "warm": [0] * n}
        for idx in self.groups(prompts):
            ids = [prompts[i] for i in idx]
            doc_len = len(ids[0]) - len(self.question)
            for mode in ("cold", "warm"):
                req = self.cached(cfg, ids, doc_len) if mode == "warm" else eng.new(cfg, len(ids))
                logits = eng.forward(cfg, [req], [x[req.length:] for x in ids])
                for i, out in zip(idx, eng.greedy(cfg, [req], logits, 8)):
                    hits[mode][i] = int(str(self.keys[L][i]) in eng.tok.decode(out))
                del req
        for mode, suffix in (("cold", ""), ("warm", "_warm")):
            p, se = binomial(hits[mode])
            r.setdefault("passkey" + suffix, {})[str(L)] = p
            r.setdefault("passkey" + suffix + "_se", {})[str(L)] = se
            r.setdefault("passkey_hits", {}).setdefault(mode, {})[str(L)] = hits[mode]


def sweep_table(res):
    """The README's sweep table from a sweep JSON: each cell value ± its standard error."""
    lengths = [str(L) for L in res["passkey"]["lengths"]]
    pm = lambda r, k, L=None: "–" if (r.get(k) if L is None else r.get(k, {}).get(L)) is None else \
        (f"{r[k]:.3f} ± {r[k + '_se']:.3f}" if L is None else f"{r[k][L]:.2f} ± {r[k + '_se'][L]:.2f}")  # noqa: E731
    f = lambda x, spec: "–" if x is None else format(x, spec)  # noqa: E731
    head = ["point", "capacity", "radix unit", "Δppl", "Δppl warm"] + \
        [f"passkey {int(L) // 1024 or L}{'k' if int(L) >= 1024 else ''} cold / warm" for L in lengths] + \
        ["agreement cold", "agreement warm", "cold vs warm"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        cells = [r["name"], f"{r['capacity']['capacity_ratio']:.2f}x", str(r["radix_granularity"]),
                 f(r.get("dppl"), "+.3f"), f(r.get("dppl_warm"), "+.3f")]
        cells += [f"{pm(r, 'passkey', L)} / {pm(r, 'passkey_warm', L)}" for L in lengths]
        cells += [pm(r, "agreement"), pm(r, "agreement_warm"), pm(r, "cold_vs_warm")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def needle_heatmap(res, path, bins=10):
    """Needle in a haystack: accuracy by depth (rows, binned) x length (columns), bf16 vs the default
    oscar-2 vs kivi-2, cold and warm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {r["name"]: r for r in res["rows"] if "passkey_hits" in r}
    # kivi-2 at the default's prefill where it ran, else at the other
    kivi = [n for pf in (OscarConfig().prefill, "page", "chunk")
            if (n := point_name(OscarConfig(method="kivi", prefill=pf))) in rows][:1]
    want = [n for n in ("bf16", point_name(OscarConfig())) if n in rows] + kivi
    if not want:
        return
    lengths = [str(L) for L in res["passkey"]["lengths"]]
    n = res["passkey"]["trials"]
    bins = min(bins, n)
    fig, axes = plt.subplots(2, len(want), figsize=(3.6 * len(want) + 1, 7), squeeze=False)
    for c, name in enumerate(want):
        for m, mode in enumerate(("cold", "warm")):
            ax, hits = axes[m][c], rows[name]["passkey_hits"].get(mode, {})
            grid = torch.full((bins, len(lengths)), float("nan"))
            for j, L in enumerate(lengths):
                if L in hits:
                    for b in range(bins):
                        cell = [h for i, h in enumerate(hits[L]) if min(bins - 1, i * bins // n) == b]
                        grid[b, j] = sum(cell) / len(cell)
            im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            for b in range(bins):
                for j in range(len(lengths)):
                    if not math.isnan(grid[b, j]):
                        ax.text(j, b, f"{grid[b, j]:.1f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [f"{int(L) // 1024}k" if int(L) >= 1024 else L for L in lengths])
            ax.set_yticks(range(bins), [f"{100 * (b + 0.5) / bins:.0f}%" for b in range(bins)])
            ax.set_title(f"{name} ({mode})", fontsize=9)
            if c == 0:
                ax.set_ylabel("needle depth")
            if m == 1:
                ax.set_xlabel("prompt length (tokens)")
    fig.colorbar(im, ax=axes, shrink=0.6, label="passkey accuracy")
    fig.suptitle(f"{res['model']}: needle in a haystack, {n} trials per length, {res['hardware']}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw(res, path):
    """A results JSON's PNGs next to it: the summary plot, and for a sweep the needle heat map."""
    path = Path(path)
    plot(res, path.with_suffix(".png"))
    if res.get("sweep"):
        needle_heatmap(res, path.with_name(path.stem + "_needle.png"))


def device_tag(device):
    """A results file's device suffix: h200 / h100 from the CUDA device's name, else cpu."""
    if device.type != "cuda":
        return "cpu"
    m = re.search(r"\b([A-Z]+\d{2,})\b", torch.cuda.get_device_name(device))
    return m.group(1).lower() if m else "cuda"


# ---- the plot -------------------------------------------------------------------------------------
def plot(res, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if "ppl" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [r["name"] for r in rows]
    colors = [{"bf16": "0.5", "kivi": "tab:orange", "quarot": "tab:blue", "oscar": "tab:green"}[r["method"]]
              for r in rows]
    base = rows[0]["ppl"]
    axes[0].bar(names, [r["ppl"] - base for r in rows], color=colors)
    axes[0].set_ylabel(f"perplexity increase over bf16 ({base:.3f})")
    axes[0].set_yscale("symlog", linthresh=0.01)
    axes[1].bar(names, [r.get("agreement", 0) for r in rows], color=colors)
    axes[1].set_ylabel(f"greedy agreement with bf16 ({res['agreement']['generated_tokens']} tokens)")
    axes[1].set_ylim(0, 1)
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=45)
    for r, c in zip(rows, colors):
        if "passkey" in r:
            ls = [int(k) for k in r["passkey"]]
            bf16 = r["method"] == "bf16"   # drawn wide and underneath: 4-bit rows often lie on it
            axes[2].plot(ls, list(r["passkey"].values()), "o" + ("--" if r["bits"] == 4 else "-"), color=c,
                         label=r["name"], alpha=1 if r["page_size"] == 64 else 0.5, lw=4 if bf16 else 1.5,
                         zorder=1 if bf16 else 2)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("passkey prompt length (tokens)")
    axes[2].set_ylabel("passkey accuracy")
    axes[2].set_ylim(-0.05, 1.05)
    if axes[2].lines:
        axes[2].legend(fontsize=7)
    fig.suptitle(f"{res['model']} KV-cache quantization, {res['hardware']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(res):
    """The README's results table, straight from the JSON. A backend run's cells also give the
    reference row's value, and its Δppl is over the reference row (it has no bf16 row)."""
    lengths = res["passkey"]["lengths"]
    backend = "compared_to" in res
    base = None if backend else next(r["ppl"] for r in res["rows"] if r["method"] == "bf16")
    head = ["method", "page", "ppl", "Δppl vs reference" if backend else "Δppl"] + \
        [f"passkey {L // 1024}k" for L in lengths] + ["agreement"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    fmt = lambda x, f: "–" if x is None else f.format(x)  # noqa: E731

    def cell(r, key, f, length=None):
        get = (lambda d: (d.get(key) or {}).get(length)) if length else (lambda d: d.get(key))
        ours = fmt(get(r), f)
        return f"{ours} (ref {fmt(get(r.get('reference', {})), f)})" if backend else ours
    for r in res["rows"]:
        delta = r.get("diff", {}).get("ppl") if backend else None if "ppl" not in r else r["ppl"] - base
        lines.append("| " + " | ".join(
            [r["name"].split("/")[0], str(r["page_size"]), cell(r, "ppl", "{:.3f}"), fmt(delta, "{:+.3f}")]
            + [cell(r, "passkey", "{:.2f}", str(L)) for L in lengths] + [cell(r, "agreement", "{:.3f}")]) + " |")
    return "\n".join(lines)


def merge(paths, out):
    """Union of the rows (field by field) and of the prefill study of several partial runs of one study."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    res = runs[0]
    order = [tuple(r) for r in MAIN_ROWS]
    rows = {}
    for run in runs:
        for r in run["rows"]:
            row = rows.setdefault((r["method"], r["bits"] if r["method"] != "bf16" else 2, r["page_size"]), {})
            passkey = {**(row.get("passkey") or {}), **(r.get("passkey") or {})}  # lengths from every run
            row.update({k: v for k, v in r.items() if v is not None})
            if passkey:
                row["passkey"] = passkey
        for mode, d in run.get("prefill_study", {}).items():
            if isinstance(d, dict):
                res["prefill_study"].setdefault(mode, {}).update(d)
            else:
                res["prefill_study"][mode] = d
    res["rows"] = [rows[k] for k in order if k in rows]
    lengths = [str(L) for L in res["passkey"]["lengths"]]
    res["complete"] = len(res["rows"]) == len(order) and all(
        "ppl" in r and all(L in r.get("passkey", {}) for L in lengths) for r in res["rows"])
    # wall time of each merged run (a merged input contributes its own list)
    res["run_s"] = [t for run in runs
                    for t in run.get("run_s", [run.get("elapsed_s", 0) + run.get("elapsed_before_resume_s", 0)])]
    res["elapsed_s"] = max(res["run_s"])
    res["merged_from"] = sum(run.get("merged_from", 1) for run in runs)
    out.write_text(json.dumps(res, indent=1))
    plot(res, out.with_suffix(".png"))
    print(table(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke run")
    ap.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--trials", type=int, help="passkey trials per length (default 20, the reference run's; "
                    "--sweep 60; fewer makes a backend run faster but not like for like)")
    ap.add_argument("--prompts", type=int, default=20, help="chat prompts for greedy agreement")
    ap.add_argument("--attention", choices=("reference", "backend"), default="reference",
                    help="reference: reference.attend over store_pages (the spec); backend: the serving "
                    "backend (CUDA kernels where they run, else the batched torch path), compared with a "
                    "reference run")
    ap.add_argument("--rows", help="run only these rows, e.g. oscar-2-64,oscar-4-64 (method-bits-page; "
                    f"bf16-64); --attention backend defaults to {BACKEND_ROWS}")
    ap.add_argument("--compare-to", metavar="JSON", help="--attention backend: the reference run compared "
                    "with (default bench/results/accuracy.json; with --quick, the temp dir's quick run)")
    ap.add_argument("--device", default="cpu", help="torch device for the model and the reference kernels")
    ap.add_argument("--out", help="results JSON (default bench/results/accuracy.json; the PNG goes next to it)")
    ap.add_argument("--resume", action="store_true", help="keep what the JSON already holds, run the rest")
    ap.add_argument("--table", metavar="JSON", help="print the results table of a finished run and exit")
    ap.add_argument("--lengths", default="1024,2048,4096,8192", help="passkey prompt lengths")
    ap.add_argument("--plan", help="run only these pieces, in order: ppl:NAME, passkey:NAME, study, "
                    "study-passkey (NAME as in the table, e.g. oscar-2/p32); needs --resume for the bf16 answers")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="merge the rows of partial runs into --out and exit")
    ap.add_argument("--sweep", action="store_true", help="the powered design-point study, cold and warm "
                    "(-> bench/results/accuracy_sweep.json, its PNG and _needle.png heat map)")
    ap.add_argument("--points", help="--sweep: only these design points, in this order (names as in its table)")
    ap.add_argument("--budget-s", type=float, help="--sweep: start no piece that would end past this many "
                    "seconds after start-up (each piece's time estimated from the longest of its kind so far)")
    ap.add_argument("--batch-tokens", type=int, default=131072, help="--sweep: most tokens of equal-length "
                    "sequences run as one batch (bounds the attention's score tensors)")
    ap.add_argument("--plot", metavar="JSON", help="draw a results JSON's PNGs (a stopped run's too) and exit")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 avoids OpenMP stalls on small shared machines)")
    args = ap.parse_args()
    if args.table:
        res = json.loads(Path(args.table).read_text())
        print(sweep_table(res) if res.get("sweep") else table(res))
        return
    if args.plot:
        draw(json.loads(Path(args.plot).read_text()), args.plot)
        return
    if args.merge:
        merge(args.merge, Path(args.out or RESULTS / "accuracy.json"))
        return
    torch.set_num_threads(args.threads)
    if args.sweep:
        # a run stopped from outside (a time limit's SIGTERM) still writes and draws what finished
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        Sweep(args).run()
    else:
        Study(args).run()


if __name__ == "__main__":
    main()
