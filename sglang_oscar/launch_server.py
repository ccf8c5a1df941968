"""`python -m sglang_oscar.launch_server [SGLang flags] [--oscar-* flags]`: SGLang's HTTP server with OScaR.

Parses the --oscar-* flags, refuses flags and models OScaR cannot serve (one clear message), fills
in what the plugin needs (the `oscar` backend, page size, a bounded request count, no CUDA graphs,
SGLang's CPU engine settings on a machine without CUDA, the embedded default model), hands the
config to SGLang's scheduler processes through SGLANG_OSCAR_CONFIG, then runs SGLang's own server.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys

from .config import ENV, OscarConfig
from .hadamard import is_power_of_two

logger = logging.getLogger("sglang_oscar")

SUPPORTED_ARCHS = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
DEFAULT_PAGE = 64
REFUSED_FLAGS = {
    "--enable-hierarchical-cache": "HiCache copies raw KV bytes",
    "--enable-kv-cache-sharding": "KV sharding re-lays out raw KV pages",
    "--enable-unified-memory": "the unified memory pool has its own KV layout",
    "--enable-lmcache": "LMCache copies raw KV bytes",
    "--enable-dp-attention": "DP attention is not supported by the oscar backend",
}


class LaunchError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"sglang_oscar: error: {msg}")


def _value(argv, flag):
    """Value of `flag X` / `flag=X` in argv (last one wins), or None."""
    val = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            val = argv[i + 1]
        elif a.startswith(flag + "="):
            val = a.split("=", 1)[1]
    return val


def _has(argv, flag):
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


def check_model(model_path: str) -> None:
    """Refuse models OScaR cannot serve, from their config.json (before SGLang loads anything)."""
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        return  # a hub id or other source: SGLang resolves it; the pool/backend checks still apply
    with open(path) as f:
        c = json.load(f)
    archs = set(c.get("architectures") or [])
    if "kv_lora_rank" in c or "q_lora_rank" in c:
        raise LaunchError(f"{model_path}: MLA models are not supported by OScaR (MHA/GQA only)")
    if not archs & SUPPORTED_ARCHS:
        raise LaunchError(f"{model_path}: architecture {sorted(archs)} is not supported "
                          f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    if not is_power_of_two(head_dim) or head_dim < 32:
        raise LaunchError(f"{model_path}: head_dim {head_dim} is not a power of two >= 32 "
                          "(the per-head Hadamard and 32-channel V groups need one)")
    if c.get("use_sliding_window") or (c.get("sliding_window") and "Mistral" in " ".join(archs)):
        raise LaunchError(f"{model_path}: sliding-window attention is not supported by OScaR")


def build_argv(cfg: OscarConfig, rest: list[str], on_cuda: bool) -> list[str]:
    """Validate SGLang flags against the config and add what the plugin needs."""
    argv = list(rest)
    if cfg.quantized:
        kv = _value(argv, "--kv-cache-dtype")
        if kv not in (None, "auto", "bf16", "bfloat16"):
            raise LaunchError(f"--kv-cache-dtype {kv} cannot be combined with --oscar-method {cfg.method} "
                              "(OScaR stores its own packed format; use --oscar-method bf16 for plain SGLang)")
        for flag in ("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend"):
            val = _value(argv, flag)
            if val not in (None, "oscar"):
                raise LaunchError(f"{flag} {val} cannot be combined with --oscar-method {cfg.method} "
                                  "(OScaR serves through its own 'oscar' backend)")
        spec = [a.split("=")[0] for a in argv if a.startswith("--speculative-")]
        if spec:
            raise LaunchError(f"speculative decoding ({spec[0]}) is not supported with OScaR "
                              "(draft KV moves copy raw KV bytes)")
        for flag, why in REFUSED_FLAGS.items():
            if _has(argv, flag):
                raise LaunchError(f"{flag} is not supported with OScaR: {why}")
        mode = _value(argv, "--disaggregation-mode")
        if mode not in (None, "null"):
            raise LaunchError("PD disaggregation is not supported with OScaR (it transfers raw KV bytes)")
        dcp = _value(argv, "--dcp-size")
        if dcp not in (None, "1"):
            raise LaunchError("decode context parallelism (--dcp-size > 1) is not supported with OScaR")
        page = _value(argv, "--page-size")
        if page is not None and int(page) != cfg.page_size:
            raise LaunchError(f"--page-size {page} differs from --oscar-page-size {cfg.page_size}")
        if page is None:
            argv += ["--page-size", str(cfg.page_size)]
        if not _has(argv, "--attention-backend"):
            argv += ["--attention-backend", "oscar"]
        if not _has(argv, "--max-running-requests"):
            # The raw residual is one partial page per request row: keep the row count bounded.
            argv += ["--max-running-requests", "128" if on_cuda else "32"]
        for flag in ("--cuda-graph-backend-decode", "--cuda-graph-backend-prefill"):
            if not _has(argv, flag):
                argv += [flag, "disabled"]
    if on_cuda and not _has(argv, "--sampling-backend") and importlib.util.find_spec("flashinfer") is None:
        # SGLang picks FlashInfer's sampler on any CUDA platform; without the package, torch's sampler.
        argv += ["--sampling-backend", "pytorch"]
    if not on_cuda:
        if not _has(argv, "--device"):
            argv += ["--device", "cpu"]
        if not _has(argv, "--attention-backend"):
            argv += ["--attention-backend", "torch_native"]
        for flag, val in (("--sampling-backend", "pytorch"), ("--cuda-graph-backend-decode", "disabled"),
                          ("--cuda-graph-backend-prefill", "disabled")):
            if not _has(argv, flag):
                argv += [flag, val]
        if not _has(argv, "--skip-server-warmup"):
            argv.append("--skip-server-warmup")
        if not _has(argv, "--sleep-on-idle"):
            # An idle scheduler otherwise busy-polls one core, which the running server's torch threads
            # (or a second server on the same machine) then lack.
            argv.append("--sleep-on-idle")
    return argv


def resolve(argv: list[str]):
    """(config, SGLang argv) from the user's argv; raises LaunchError on bad input."""
    ns, rest = OscarConfig.parse_known_args(argv)
    page = ns.oscar_page_size or int(_value(rest, "--page-size") or DEFAULT_PAGE)
    try:
        cfg = OscarConfig(method=ns.oscar_method, bits=ns.oscar_bits, page_size=page, prefill=ns.oscar_prefill,
                          kv_budget_gb=ns.oscar_kv_budget_gb)
    except ValueError as e:
        raise LaunchError(str(e)) from None
    if not _has(rest, "--model-path") and not _has(rest, "--model"):
        from .model import default_model_path
        rest = ["--model-path", default_model_path()] + rest
    model = _value(rest, "--model-path") or _value(rest, "--model")
    if cfg.quantized:
        check_model(model)
    return cfg, build_argv(cfg, rest, cuda_available())


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        p = argparse.ArgumentParser(prog="python -m sglang_oscar.launch_server",
                                    description="SGLang server with OScaR KV-cache quantization. "
                                    "All SGLang flags are accepted; SGLang's own help follows.")
        OscarConfig.add_cli_args(p)
        p.print_help()
        print()
    cfg, sglang_argv = resolve(argv)
    if cfg.quantized or cfg.kv_budget_gb is not None:
        os.environ[ENV] = cfg.to_json()
    else:
        os.environ.pop(ENV, None)  # plain SGLang: the plugin stays inert
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
