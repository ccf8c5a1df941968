"""Accuracy of bf16 / KIVI / QuaRot / OScaR KV caches on the real default model, in-process (transformers).

Every attention call goes through the functions the server's pool and backend use: full pages are
packed with quant.store_pages, and queries attend through reference.attend with their quantized
boundaries from reference.boundaries. A per-request, per-layer cache holds the packed pages and the
raw (bf16) tail, so prefix sharing, cache hits and decode are incremental, as in the server.

    python bench/accuracy.py            # the full study -> bench/results/accuracy.{json,png}
    python bench/accuracy.py --quick    # a small smoke run (written to the temp dir)
    python bench/accuracy.py --resume   # continue an interrupted run from its JSON
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
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

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
    pages: dict | None = None       # packed full pages 0..n-1 (layout.FIELDS, leading page dim)
    raw_k: torch.Tensor | None = None  # raw bf16 keys/values at positions raw_start ...
    raw_v: torch.Tensor | None = None
    raw_start: int = 0

    @property
    def n_pages(self):
        return 0 if self.pages is None else self.pages["k_norm"].shape[0]


def slice_pages(pages, n):
    return None if pages is None or n == 0 else {k: v[:n] for k, v in pages.items()}


class Request:
    """One sequence's KV state across all layers."""

    def __init__(self, n_layers):
        self.layers = [LayerCache() for _ in range(n_layers)]
        self.length = 0

    def prefix(self, n_tokens, cfg):
        """A new request holding only what the radix tree would give it: the first n_tokens
        (whole packed pages for quantized methods, raw for bf16). A view: shares tensors."""
        r = Request(0)
        for lc in self.layers:
            if cfg.quantized:
                n = n_tokens // cfg.page_size
                c = LayerCache(slice_pages(lc.pages, n), lc.raw_k[:0], lc.raw_v[:0], n * cfg.page_size)
            else:
                c = LayerCache(None, lc.raw_k[:n_tokens], lc.raw_v[:n_tokens], 0)
            r.layers.append(c)
        r.length = n_tokens - n_tokens % cfg.page_size if cfg.quantized else n_tokens
        return r


@dataclasses.dataclass
class Step:
    """What the attention function needs for one forward call (set around model calls)."""
    cfg: OscarConfig
    requests: list
    positions: list          # per request: LongTensor [T]
    prefix_lens: list        # per request: tokens already cached (decides qb in "chunk" mode)
    keep_raw: bool = False   # keep raw K/V below the packed boundary (the chunk-mode study)
    backend: object = None   # --attention backend: the OscarAttnBackend and this forward's fake batch
    batch: object = None
    decode: bool = False     # a decode step (forward_decode), else an extend (forward_extend)


STEP: Step | None = None


def extend(lc: LayerCache, q, k, v, pos, prefix_len, cfg: OscarConfig, scale, keep_raw):
    """Append this chunk's K/V to one layer's cache, pack its full pages, attend. q [T, Hq, D]."""
    k, v = k.to(torch.bfloat16), v.to(torch.bfloat16)  # the cache holds the model dtype
    lc.raw_k = k if lc.raw_k is None else torch.cat([lc.raw_k, k])
    lc.raw_v = v if lc.raw_v is None else torch.cat([lc.raw_v, v])
    end = int(pos[-1]) + 1
    if not cfg.quantized:
        qb = torch.zeros_like(pos)
    else:
        P = cfg.page_size
        n_old, n_new = lc.n_pages, end // P
        if n_new > n_old:  # pages are packed before attention: later queries of the chunk may read them
            s = n_old * P - lc.raw_start
            H, D = k.shape[1:]
            kk = lc.raw_k[s:s + (n_new - n_old) * P].reshape(n_new - n_old, P, H, D)
            vv = lc.raw_v[s:s + (n_new - n_old) * P].reshape(n_new - n_old, P, H, D)
            new = store_pages(kk, vv, cfg)
            lc.pages = new if lc.pages is None else {f: torch.cat([lc.pages[f], new[f]]) for f in new}
        qb = boundaries(pos, prefix_len, cfg)
    outs = []
    # Blocks aligned to absolute positions: a query sees the same call shapes whether its chunk
    # started at 0 or after a cached prefix, so hit and miss differ only where the semantics do.
    p0 = int(pos[0])
    cuts = [0] + list(range(BLOCK - p0 % BLOCK, q.shape[0], BLOCK)) + [q.shape[0]]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if a == b:
            continue
        qpos, qqb = pos[a:b], qb[a:b]
        lo, hi = int(qqb.min()), int(qpos.max()) + 1
        pages = slice_pages(lc.pages, int(qqb.max()) // cfg.page_size) if cfg.quantized else None
        rk = lc.raw_k[lo - lc.raw_start:hi - lc.raw_start]
        rv = lc.raw_v[lo - lc.raw_start:hi - lc.raw_start]
        outs.append(attend(q[a:b], qpos, qqb, pages, rk, rv, lo, cfg, sm_scale=scale))
    if cfg.quantized and not keep_raw:  # the pool keeps only the partial last page raw
        cut = lc.n_pages * cfg.page_size - lc.raw_start
        if cut > 0:
            lc.raw_k, lc.raw_v, lc.raw_start = lc.raw_k[cut:], lc.raw_v[cut:], lc.raw_start + cut
    return torch.cat(outs)


def oscar_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, T, D], key/value [B, H, T, D] (post-RoPE)."""
    st = STEP
    if st.backend is not None:
        return backend_attention(st, module.layer_idx, query, key, value, scaling)
    outs = []
    for i, req in enumerate(st.requests):
        lc = req.layers[module.layer_idx]
        outs.append(extend(lc, query[i].transpose(0, 1), key[i].transpose(0, 1), value[i].transpose(0, 1),
                           st.positions[i], st.prefix_lens[i], st.cfg, scaling, st.keep_raw))
    return torch.stack(outs).to(query.dtype), None


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
        STEP = Step(cfg, reqs, pos, prefix_lens or [r.length for r in reqs], keep_raw, decode=decode)
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
            out = m.model(input_ids=torch.tensor(ids, device=self.device), position_ids=torch.stack(pos),
                          use_cache=False)
        finally:
            STEP = None
        for r in reqs:
            r.length += T
        h = out.last_hidden_state
        return h if hidden else m.lm_head(h[:, -1:]).float()[:, 0]

    def new(self, cfg):
        return BackendRequest(self.backend_pool(cfg)) if self.attention == "backend" else Request(self.n_layers)

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
        toks = [[int(l.argmax())] for l in first_logits]
        for _ in range(n - 1):
            logits = self.forward(cfg, reqs, [[t[-1]] for t in toks], decode=True)
            for t, l in zip(toks, logits):
                t.append(int(l.argmax()))
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


def chat_prompts(tok, docs_text, n, excerpt_tokens):
    """n chat prompts, each a passage from the text plus a task (long enough to fill packed pages)."""
    tasks = ["Summarize the passage above in two sentences.", "What is the main topic of this text?",
             "List three obligations that this text describes.", "Explain the passage above to a child.",
             "Which rights does this text give to the reader?", "Write one question a lawyer might ask about this."]
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


# ---- the study ----------------------------------------------------------------------------------
def row_key(method, bits, page):
    """A row's name for --rows: oscar-2-64 (method-bits-page), bf16-64."""
    return f"bf16-{page}" if method == "bf16" else f"{method}-{bits}-{page}"


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
    return [OscarConfig(method=m, bits=b, page_size=p) for m, b, p in MAIN_ROWS if row_key(m, b, p) in want]


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
        self.trials = 3 if args.quick else args.trials
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
            "model": MODEL_NAME, "hardware": f"CPU ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} cores), torch {torch.__version__}, bf16 weights, reference (torch) kernels",
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
        if self.eng.device.type == "cuda":
            self.result["hardware"] = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 " \
                                      "weights, reference (torch) attention and quantization"
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
        path.parent.mkdir(parents=True, exist_ok=True)
        self.result["elapsed_s"] = round(time.time() - self.t0)
        if self.eng.attention == "backend":
            self.update_comparison()
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.result, indent=1))
        os.replace(tmp, path)
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
        cfgs = [OscarConfig(method=m, bits=b, page_size=p) for m, b, p in rows]
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
        main = self.row(OscarConfig(method="oscar", bits=2, page_size=64))  # the "page" default
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
    ap.add_argument("--trials", type=int, default=20, help="passkey trials per length (the reference run's "
                    "20 by default; fewer makes a backend run faster but not like for like)")
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
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1 avoids OpenMP stalls on small shared machines)")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if args.merge:
        merge(args.merge, Path(args.out or RESULTS / "accuracy.json"))
        return
    torch.set_num_threads(args.threads)
    Study(args).run()


if __name__ == "__main__":
    main()
