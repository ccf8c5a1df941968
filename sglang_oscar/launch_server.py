"""`python -m sglang_oscar.launch_server [SGLang flags] [--oscar-* flags]`: SGLang's HTTP server with OScaR.

Parses the --oscar-* flags, refuses flags and models OScaR cannot serve (one clear message), fills
in what the plugin needs (the `oscar` backend, page size, a bounded request count, eager prefill,
SGLang's CPU engine settings on a machine without CUDA, the embedded default model), hands the
config to SGLang's scheduler processes through SGLANG_OSCAR_CONFIG, then runs SGLang's own server.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import os
import sys

from .config import OscarConfig, set_current
from .shapes import head_dim_problem

logger = logging.getLogger("sglang_oscar")

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
DEFAULT_PAGE = 64
PROG = "python -m sglang_oscar.launch_server"


class LaunchError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"sglang_oscar: error: {msg}")


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


# ---- SGLang's own argument parsing ------------------------------------------------------------
def sglang_parser() -> argparse.ArgumentParser:
    """SGLang's server parser, with "oscar" among the attention backends."""
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.server_args import ServerArgs

    if "oscar" not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices(["oscar"])
    parser = argparse.ArgumentParser(prog=PROG)
    ServerArgs.add_cli_args(parser)
    return parser


def parse_sglang_args(argv: list[str]) -> argparse.Namespace:
    """What SGLang itself will read from argv: its parser (abbreviations, aliases, `--config` files),
    except that --model-path may be left out here (the embedded default model fills it in)."""
    parser = sglang_parser()
    for action in parser._actions:
        if action.dest == "model_path":
            action.required = False
    if "--config" in argv:  # the same merge prepare_server_args does
        from sglang.srt.utils.server_args_config_parser import ConfigArgumentMerger
        argv = ConfigArgumentMerger(parser).merge_config_with_args(argv)
    return parser.parse_args(argv)


# ---- what OScaR cannot serve ------------------------------------------------------------------
def _kv_dtype(a):
    if a.kv_cache_dtype not in ("auto", "bf16", "bfloat16"):
        return (f"--kv-cache-dtype {a.kv_cache_dtype} cannot be combined with --oscar-method {{method}} "
                "(OScaR stores its own packed format; use --oscar-method bf16 for plain SGLang)")


def _backends(a):
    for flag in ("attention_backend", "prefill_attention_backend", "decode_attention_backend"):
        val = getattr(a, flag)
        if val not in (None, "oscar"):
            return (f"--{flag.replace('_', '-')} {val} cannot be combined with --oscar-method {{method}} "
                    "(OScaR serves through its own 'oscar' backend)")


def _speculative(a):
    decoupled = a.decoupled_spec_role not in (None, "null")
    if a.speculative_algorithm is not None or a.speculative_draft_model_path is not None or decoupled:
        what = a.speculative_algorithm or (f"--decoupled-spec-role {a.decoupled_spec_role}" if decoupled
                                           else "a draft model")
        return (f"speculative decoding ({what}) is not supported with OScaR "
                "(draft KV moves copy raw KV bytes)")


def _flag(field, why, bad=bool):
    """A refusal for one ServerArgs field: message when bad(value)."""
    def check(a):
        val = getattr(a, field)
        if bad(val):
            shown = f" {val}" if isinstance(val, (str, int, float)) and not isinstance(val, bool) else ""
            return f"--{field.replace('_', '-')}{shown} is not supported with OScaR: {why}"
    return check


_RAW_KV = "it copies raw K/V bytes, which the packed pool does not have"
# Every ServerArgs feature that reads, moves or re-lays out KV bytes, or that changes the weights
# the V rotation is folded into, with the reason it would silently break OScaR.
REFUSALS = (
    _kv_dtype,
    _backends,
    _speculative,
    _flag("dtype", "the raw residual pages and the kernels hold 2-byte K/V (use bfloat16 or float16)",
          lambda v: v in ("float", "float32")),
    _flag("enable_hierarchical_cache", "HiCache " + _RAW_KV),
    _flag("hicache_storage_backend", "HiCache storage " + _RAW_KV, lambda v: v is not None),
    _flag("enable_hisparse", "HiSparse offloads raw K/V"),
    _flag("enable_lmcache", "LMCache " + _RAW_KV),
    _flag("enable_flexkv", "FlexKV " + _RAW_KV),
    _flag("enable_unified_cache_external_linker", "the external KV linker " + _RAW_KV),
    _flag("disaggregation_mode", "PD disaggregation transfers raw KV bytes", lambda v: v not in (None, "null")),
    _flag("enable_pd_role_switch", "PD role switching transfers raw KV bytes"),
    _flag("enable_kv_cache_sharding", "KV sharding re-lays out raw KV pages"),
    _flag("enable_unified_memory", "the unified memory pool has its own KV layout"),
    _flag("enable_page_major_kv_layout", "the page-major layout is a different KV pool"),
    _flag("enable_dp_attention", "DP attention is not supported by the oscar backend"),
    _flag("attn_dp_size", "DP attention is not supported by the oscar backend", lambda v: (v or 1) > 1),
    _flag("dcp_size", "decode context parallelism splits a request's KV across ranks", lambda v: (v or 1) > 1),
    _flag("attn_cp_size", "context parallelism splits a request's KV across ranks", lambda v: (v or 1) > 1),
    _flag("enable_prefill_cp", "context-parallel prefill splits a request's KV across ranks"),
    _flag("enable_lora", "the V rotation is folded into v_proj/o_proj, and a LoRA adapter's delta on "
          "those projections would bypass it"),
    _flag("lora_paths", "the V rotation is folded into v_proj/o_proj, and a LoRA adapter's delta on "
          "those projections would bypass it", lambda v: bool(v)),
    _flag("quantization", "the V rotation is folded into v_proj/o_proj, which needs unquantized weights",
          lambda v: v is not None),
    _flag("modelopt_quant", "the V rotation is folded into v_proj/o_proj, which needs unquantized weights",
          lambda v: v is not None),
    _flag("enable_memory_saver", "releasing and resuming memory would restore v_proj/o_proj without the "
          "folded V rotation, and the packed pool is not registered with the memory saver"),
    _flag("enable_streaming_session", "a streaming session keeps its KV, partial page included, outside "
          "the radix tree, where the packed pool's per-request residual row does not follow it"),
    _flag("enable_session_radix_cache", "session caching keeps a request's partial page outside the "
          "per-request residual row of the packed pool"),
    _flag("kv_canary", "the KV canary attaches its own buffers to the KV pool and checks raw K/V writes",
          lambda v: v not in (None, "none")),
    _flag("kv_canary_real_data", "the KV canary reads raw K/V bytes", lambda v: v not in (None, "none")),
)


def refusal(a: argparse.Namespace, cfg: OscarConfig) -> str | None:
    """The first reason OScaR cannot serve these (parsed) SGLang arguments, or None."""
    for check in REFUSALS:
        msg = check(a)
        if msg:
            return msg.replace("{method}", cfg.method)
    if a.page_size is not None and a.page_size != cfg.page_size:
        return f"--page-size {a.page_size} differs from --oscar-page-size {cfg.page_size}"
    if cfg.reference_only:
        return f"{cfg.reference_only}: implemented only in the torch reference (bench/accuracy.py), not served"
    return None


def model_config(model_path: str) -> dict | None:
    """A local model's config.json (None for a hub id or other source SGLang resolves itself)."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def head_dim_of(c: dict) -> int:
    return c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]


def model_problem(model_path: str) -> str | None:
    """Why OScaR cannot serve this model, from its config.json (before SGLang loads anything)."""
    c = model_config(model_path)
    if c is None:
        return None  # SGLang resolves it; the pool/backend checks still apply
    archs = set(c.get("architectures") or [])
    if "kv_lora_rank" in c or "q_lora_rank" in c:
        return f"{model_path}: MLA models are not supported by OScaR (MHA/GQA only)"
    if not archs & SUPPORTED_ARCHS:
        return (f"{model_path}: architecture {sorted(archs)} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
    if c.get("quantization_config"):
        method = c["quantization_config"].get("quant_method", "?")
        return (f"{model_path}: quantized weights ({method}) are not supported by OScaR "
                "(the V rotation is folded into v_proj/o_proj, which needs unquantized weights)")
    problem = head_dim_problem(head_dim_of(c))
    if problem:
        return f"{model_path}: {problem}"
    if c.get("use_sliding_window") or (c.get("sliding_window") and "Mistral" in " ".join(archs)):
        return f"{model_path}: sliding-window attention is not supported by OScaR"
    return None


def serve_problem(a, cfg: OscarConfig) -> str | None:
    """Why OScaR cannot serve these SGLang arguments (a parse or a ServerArgs) and their model, or None.

    The launcher asks before starting SGLang; the oscar backend's factory asks again, for a server
    started through SGLang's own launcher with the plugin's config in the environment.
    """
    return refusal(a, cfg) or tp_problem(a, cfg) or model_problem(a.model_path)


def tp_problem(a, cfg: OscarConfig) -> str | None:
    tp = a.tp_size or 1
    if tp > 1 and not cuda_available():
        return f"--tp-size {tp}: tensor parallelism with OScaR needs CUDA GPUs (the CPU path serves one rank)"
    if tp != cfg.tp:
        return (f"the server runs --tp-size {tp} but the OScaR config was made for tp={cfg.tp} "
                "(start it with python -m sglang_oscar.launch_server)")
    return None


# ---- what the plugin needs, added where the user left SGLang's default -------------------------
def additions(cfg: OscarConfig, a: argparse.Namespace, on_cuda: bool) -> list[str]:
    """SGLang flags to append to the user's argv (each only where the parsed value is unset)."""
    add = []
    if a.served_model_name is None and os.path.isdir(a.model_path):
        # SGLang would call a local model by its filesystem path in /v1/models and in responses.
        add += ["--served-model-name", os.path.basename(os.path.normpath(a.model_path))]
    if cfg.quantized:
        if a.page_size is None:
            add += ["--page-size", str(cfg.page_size)]
        if a.attention_backend is None:
            add += ["--attention-backend", "oscar"]
        if a.max_running_requests is None:
            # The raw residual is one partial page per request row: keep the row count bounded.
            add += ["--max-running-requests", "128" if on_cuda else "32"]
        # Prefill stays eager; decode runs under SGLang's CUDA graphs wherever the kernels serve it.
        from .ops import torch_path_reason
        eager = ["cuda_graph_backend_prefill"]
        c = model_config(a.model_path)
        # A head_dim outside the kernels' matrix runs decode on the torch path, which cannot be captured.
        if not on_cuda or torch_path_reason(cfg, head_dim_of(c) if c else None):
            eager.append("cuda_graph_backend_decode")
        for flag in eager:
            if getattr(a, flag) is None:
                add += ["--" + flag.replace("_", "-"), "disabled"]
    if on_cuda and a.sampling_backend is None and importlib.util.find_spec("flashinfer") is None:
        # SGLang picks FlashInfer's sampler on any CUDA platform; without the package, torch's sampler.
        add += ["--sampling-backend", "pytorch"]
    if not on_cuda:
        for flag, val in (("device", "cpu"), ("attention_backend", "torch_native"),
                          ("sampling_backend", "pytorch"), ("cuda_graph_backend_decode", "disabled"),
                          ("cuda_graph_backend_prefill", "disabled")):
            if getattr(a, flag) is None and "--" + flag.replace("_", "-") not in add:
                add += ["--" + flag.replace("_", "-"), val]
        if not a.sleep_on_idle:
            # An idle scheduler otherwise busy-polls one core, which the running server's torch threads
            # (or a second server on the same machine) then lack.
            add.append("--sleep-on-idle")
    return add


def resolve(argv: list[str]):
    """(config, SGLang argv) from the user's argv; raises LaunchError on bad input.

    Every check reads SGLang's own parse of the arguments, so abbreviations (`--kv-cache-dt`),
    aliases and `--config` files are judged exactly as SGLang will read them.
    """
    ns, rest = OscarConfig.parse_known_args(argv)
    sg = parse_sglang_args(rest)
    try:
        cfg = OscarConfig(method=ns.oscar_method, bits=ns.oscar_bits,
                          page_size=ns.oscar_page_size or sg.page_size or DEFAULT_PAGE,
                          prefill=ns.oscar_prefill, kv_budget_gb=ns.oscar_kv_budget_gb)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if sg.model_path is None:
        from .model import default_model_path
        rest = ["--model-path", default_model_path()] + rest
        sg.model_path = rest[1]
    if cfg.quantized:
        cfg = dataclasses.replace(cfg, tp=sg.tp_size or 1)
        msg = serve_problem(sg, cfg)
        if msg:
            raise LaunchError(msg)
    return cfg, rest + additions(cfg, sg, cuda_available())


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        p = argparse.ArgumentParser(prog=PROG,
                                    description="SGLang server with OScaR KV-cache quantization. "
                                    "All SGLang flags are accepted; SGLang's own help follows.")
        OscarConfig.add_cli_args(p)
        p.print_help()
        print()
    cfg, sglang_argv = resolve(argv)
    # SGLang's scheduler processes read the config from the environment; plain bf16 without a
    # budget leaves the plugin inert.
    set_current(cfg if cfg.quantized or cfg.kv_budget_gb is not None else None)
    if not cuda_available():
        os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    from . import plugin
    plugin.register()  # before argparse: the backend choice list must contain "oscar"
    from sglang.srt.plugins import load_plugins
    load_plugins()
    from sglang.launch_server import run_server
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    server_args = prepare_server_args(sglang_argv)
    logging.basicConfig(level=logging.INFO)
    logger.info("OScaR config %s (fingerprint %s)", cfg.to_json(), cfg.fingerprint())
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
