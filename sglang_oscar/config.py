"""The one quantization config of a server: method x bits x page size (+ prefill precision).

It is global for a server (design invariant 3): every page in the radix tree was written under it.
The launcher passes it to SGLang's scheduler processes through one environment variable.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os

ENV = "SGLANG_OSCAR_CONFIG"
DEBUG_ENV = "SGLANG_OSCAR_DEBUG"  # "1": /server_info adds per-page digests and a radix tree check
METHODS = ("bf16", "kivi", "quarot", "oscar")
KEY_NORMS = ("omni", "head")
K_GROUP = 32  # tokens per K quantization group (per channel)
V_GROUP = 32  # channels per V quantization group (per token)
FORMAT_VERSION = 1  # bump when the packed layout (layout.py) changes


@dataclasses.dataclass(frozen=True)
class OscarConfig:
    method: str = "oscar"
    bits: int = 2
    page_size: int = 64
    # "chunk" (OScaR's choice, the default: the accuracy sweep's warm retrieval and perplexity favour
    # it): a prefill chunk's tokens see each other in bf16 and only the cached prefix through its
    # packed form. "page": every query sees earlier pages through their packed form and its own page
    # in bf16, in prefill exactly as in decode (in exact arithmetic, independent of the cache state).
    prefill: str = "chunk"
    # Fixed KV memory budget in GiB instead of SGLang's free-memory profile: reproducible capacity
    # comparisons across methods. Not part of the fingerprint (it decides how many pages, not their bytes).
    kv_budget_gb: float | None = None
    # Tensor-parallel degree of attention (set by the launcher from SGLang's --tp-size): a rank's pages
    # hold its share of the KV heads, so pages are shared only between servers of the same degree.
    tp: int = 1
    # Reference-only design options (the accuracy study's sweep; no kernel or pool implements them,
    # so the launcher refuses them): keep the first page (attention-sink tokens) raw in bf16, and
    # the key norm over all KV heads of a token ("omni", OScaR's) or per KV head ("head").
    raw_first_page: bool = False
    key_norm: str = "omni"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"--oscar-method must be one of {METHODS}, got {self.method!r}")
        if self.bits not in (2, 4):
            raise ValueError(f"--oscar-bits must be 2 or 4, got {self.bits}")
        if self.page_size <= 0 or self.page_size % K_GROUP:
            raise ValueError(f"the page size (--oscar-page-size or --page-size) must be a positive multiple "
                             f"of the {K_GROUP}-token K group, got {self.page_size}")
        if self.tp < 1:
            raise ValueError(f"the tensor-parallel degree must be >= 1, got {self.tp}")
        if self.prefill not in ("page", "chunk"):
            raise ValueError(f"--oscar-prefill must be 'page' or 'chunk', got {self.prefill!r}")
        if self.key_norm not in KEY_NORMS:
            raise ValueError(f"key_norm must be one of {KEY_NORMS}, got {self.key_norm!r}")
        if self.key_norm != "omni" and not self.token_norm:
            raise ValueError("a per-KV-head key norm needs a token-norm method (oscar)")
        if self.raw_first_page and not self.quantized:
            raise ValueError("a raw first page needs a quantized method")

    @property
    def quantized(self) -> bool:
        return self.method != "bf16"

    @property
    def rotate(self) -> bool:
        """Per-head Hadamard on Q/K after RoPE, and on V through the folded v_proj/o_proj weights."""
        return self.method in ("quarot", "oscar")

    @property
    def token_norm(self) -> bool:
        """Omni-token K norm: keys stored unit-norm, the norm multiplied back into the logits."""
        return self.method == "oscar"

    @property
    def reference_only(self) -> str | None:
        """The options set here that only the torch reference implements (None when there are none)."""
        opts = [o for o, on in (("raw first page", self.raw_first_page),
                                ("per-KV-head key norm", self.key_norm != "omni")) if on]
        return ", ".join(opts) or None

    @property
    def name(self) -> str:
        return "bf16" if not self.quantized else f"{self.method}-{self.bits}"

    def fingerprint(self) -> str:
        """Identifies everything that decides a page's bytes; two servers share pages only if equal."""
        d = dict(method=self.method, bits=self.bits, page=self.page_size, k_group=K_GROUP,
                 v_group=V_GROUP, rotation="sylvester-hadamard" if self.rotate else "none",
                 norm="omni-l2" if self.token_norm else "none", format=FORMAT_VERSION, tp=self.tp)
        # only where set, so the default configs keep the fingerprints servers already report
        if self.raw_first_page:
            d["raw_first_page"] = True
        if self.key_norm != "omni":
            d["norm"] = f"{self.key_norm}-l2"
        digest = hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.name}/p{self.page_size}/{digest}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "OscarConfig":
        return cls(**json.loads(text))

    @classmethod
    def from_env(cls) -> "OscarConfig | None":
        """This process's config (see current())."""
        return current()

    # ---- command line -------------------------------------------------------------------------
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("OScaR KV-cache quantization")
        g.add_argument("--oscar-method", choices=METHODS, default="oscar",
                       help="bf16 = plain SGLang; kivi = no rotation; quarot = Hadamard; "
                            "oscar = Hadamard + omni-token K norm (default)")
        g.add_argument("--oscar-bits", type=int, choices=(2, 4), default=2)
        g.add_argument("--oscar-page-size", type=int, default=None,
                       help="KV page size in tokens, a multiple of 32 (default 64; --page-size is used if given)")
        g.add_argument("--oscar-prefill", choices=("page", "chunk"), default="chunk",
                       help="prefill precision: OScaR's in-chunk bf16 (default) or page-consistent "
                            "(a radix hit computes what a miss does, up to bf16 rounding)")
        g.add_argument("--oscar-kv-budget-gb", type=float, default=None,
                       help="size the KV pool from this fixed budget instead of the free-memory profile "
                            "(also with --oscar-method bf16), for like-for-like capacity comparisons")

    @classmethod
    def parse_known_args(cls, argv):
        parser = argparse.ArgumentParser(add_help=False)
        cls.add_cli_args(parser)
        ns, rest = parser.parse_known_args(argv)
        return ns, rest


# ---- the process's config: read once --------------------------------------------------------------
_UNSET = object()
_current = _UNSET
_debug = None


def current() -> OscarConfig | None:
    """The server's config in this process: set by the launcher (set_current), or read once from
    SGLANG_OSCAR_CONFIG in SGLang's child processes, which inherit the launcher's environment."""
    global _current
    if _current is _UNSET:
        text = os.environ.get(ENV)
        _current = OscarConfig.from_json(text) if text else None
    return _current


def set_current(cfg: OscarConfig | None) -> None:
    """Make cfg this process's config and hand it to the child processes SGLang starts."""
    global _current
    if cfg is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = cfg.to_json()
    _current = cfg


def debug() -> bool:
    """SGLANG_OSCAR_DEBUG=1, read once per process."""
    global _debug
    if _debug is None:
        _debug = os.environ.get(DEBUG_ENV) == "1"
    return _debug
