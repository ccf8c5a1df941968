"""Start-up refusals (design invariant 6): one clear message, before SGLang loads anything.

Every check reads SGLang's own parse of the arguments, so abbreviations and `--config` files cannot
slip past them.
"""
from __future__ import annotations

import json
import subprocess
import sys
import types

import pytest

from sglang_oscar import config, plugin
from sglang_oscar.config import OscarConfig
from sglang_oscar.launch_server import LaunchError, parse_sglang_args, resolve

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9,
         "num_key_value_heads": 3}


def model_dir(tmp_path, **overrides):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, **overrides}))
    return str(tmp_path)


@pytest.fixture
def llama(tmp_path):
    return model_dir(tmp_path)


LORA = "LoRA adapter's delta on those projections would bypass it"
REFUSED = [
    (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3 cannot be combined"),
    (["--kv-cache-dt", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3 cannot be combined"),  # abbreviated
    (["--kv-cache-dtype=fp8_e5m2"], "--kv-cache-dtype fp8_e5m2 cannot be combined"),
    (["--attention-backend", "flashinfer"], "--attention-backend flashinfer cannot be combined"),
    (["--attention-back", "triton"], "--attention-backend triton cannot be combined"),
    (["--prefill-attention-backend", "torch_native"], "--prefill-attention-backend torch_native cannot"),
    (["--decode-attention-backend", "triton"], "--decode-attention-backend triton cannot"),
    (["--speculative-algorithm", "EAGLE"], "speculative decoding (EAGLE) is not supported"),
    (["--speculative-algo", "NGRAM"], "speculative decoding (NGRAM) is not supported"),
    (["--speculative-draft-model-path", "/x"], "speculative decoding (a draft model)"),
    (["--decoupled-spec-role", "verifier"], "speculative decoding (--decoupled-spec-role verifier)"),
    (["--decoupled-spec-role", "drafter"], "speculative decoding (--decoupled-spec-role drafter)"),
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache is not supported with OScaR: HiCache"),
    (["--enable-hierarchical"], "--enable-hierarchical-cache is not supported"),
    (["--hicache-storage-backend", "file"], "--hicache-storage-backend file is not supported"),
    (["--enable-hisparse"], "--enable-hisparse is not supported"),
    (["--enable-lmcache"], "--enable-lmcache is not supported"),
    (["--enable-flexkv"], "--enable-flexkv is not supported"),
    (["--enable-unified-cache-external-linker"],
     "--enable-unified-cache-external-linker is not supported with OScaR: the external KV linker"),
    (["--disaggregation-mode", "prefill"], "PD disaggregation"),
    (["--disaggregation-mode", "decode"], "PD disaggregation"),
    (["--enable-pd-role-switch"], "--enable-pd-role-switch is not supported with OScaR: PD role switching"),
    (["--enable-kv-cache-sharding"], "--enable-kv-cache-sharding is not supported"),
    (["--enable-unified-memory"], "--enable-unified-memory is not supported"),
    (["--enable-page-major-kv-layout"], "--enable-page-major-kv-layout is not supported"),
    (["--enable-dp-attention", "--dp-size", "2"], "DP attention"),
    (["--attn-dp-size", "2"], "DP attention"),
    (["--dcp-size", "2"], "decode context parallelism"),
    (["--attn-cp-size", "2"], "context parallelism splits"),
    (["--enable-prefill-cp"], "--enable-prefill-cp is not supported with OScaR: context-parallel prefill"),
    (["--enable-lora"], "--enable-lora is not supported with OScaR: the V rotation is folded"),
    (["--lora-paths", "a=/tmp/adapter"], LORA),
    (["--enable-memory-saver"], "--enable-memory-saver is not supported"),
    (["--dtype", "float32"], "--dtype float32 is not supported"),
    (["--dtype", "float"], "--dtype float is not supported"),
    (["--enable-streaming-session"], "--enable-streaming-session is not supported"),
    (["--enable-session-radix-cache"], "--enable-session-radix-cache is not supported"),
    (["--quantization", "fp8"], "--quantization fp8 is not supported"),
    (["--modelopt-quant", "fp8"], "--modelopt-quant fp8 is not supported with OScaR: the V rotation"),
    (["--kv-canary-real-data", "all"], "the KV canary reads raw K/V bytes"),
    (["--kv-canary", "log"], "--kv-canary log is not supported with OScaR: the KV canary attaches"),
    (["--kv-canary", "raise", "--kv-canary-sweep-interval", "8"], "--kv-canary raise is not supported"),
    (["--tp-size", "2"], "--tp-size 2: tensor parallelism with OScaR needs CUDA GPUs"),
    (["--tp", "2"], "--tp-size 2: tensor parallelism with OScaR needs CUDA GPUs"),
    (["--oscar-page-size", "128", "--page-size", "64"], "differs from --oscar-page-size"),
    (["--page-size", "16"], "multiple of the 32-token K group"),
    (["--oscar-page-size", "48"], "multiple of the 32-token K group"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_incompatible_flags_are_refused(llama, flags, message):
    with pytest.raises(LaunchError) as e:
        resolve(["--model-path", llama, *flags])
    assert message in str(e.value)


def test_tensor_parallel_degree_is_in_the_config_and_its_fingerprint(llama, monkeypatch):
    """A rank's pages hold its share of the KV heads: servers of different TP degrees share no pages."""
    from sglang_oscar import launch_server
    monkeypatch.setattr(launch_server, "cuda_available", lambda: True)
    cfg, _ = resolve(["--model-path", llama, "--tp-size", "2"])
    assert cfg.tp == 2
    assert resolve(["--model-path", llama])[0].tp == 1
    assert cfg.fingerprint() != OscarConfig().fingerprint()
    assert OscarConfig.from_json(cfg.to_json()) == cfg


def test_config_file_is_read_like_sglang_reads_it(llama, tmp_path):
    conf = tmp_path / "server.yaml"
    conf.write_text("kv-cache-dtype: fp8_e4m3\n")
    with pytest.raises(LaunchError, match="--kv-cache-dtype fp8_e4m3 cannot be combined"):
        resolve(["--model-path", llama, "--config", str(conf)])


@pytest.mark.parametrize("flags", [["--oscar-bits", "3"], ["--no-such-flag"], ["--dtype", "float8"]])
def test_bad_values_stop_with_the_parsers_message(llama, flags, capsys):
    with pytest.raises(SystemExit) as e:
        resolve(["--model-path", llama, *flags])
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


MODELS_REFUSED = [
    ({"kv_lora_rank": 512, "architectures": ["DeepseekV3ForCausalLM"]}, "MLA models are not supported"),
    ({"architectures": ["GPT2LMHeadModel"]}, "is not supported"),
    ({"head_dim": 80}, "head_dim 80 is not a power of two >= 32"),
    ({"head_dim": 16}, "head_dim 16 is not a power of two >= 32"),
    ({"use_sliding_window": True, "architectures": ["Qwen2ForCausalLM"]}, "sliding-window"),
    ({"quantization_config": {"quant_method": "awq"}}, r"quantized weights \(awq\)"),
]


@pytest.mark.parametrize("overrides, message", MODELS_REFUSED)
def test_unsupported_models_are_refused(tmp_path, overrides, message):
    with pytest.raises(LaunchError, match=message):
        resolve(["--model-path", model_dir(tmp_path, **overrides)])


# ---- the same refusals for a server started by SGLang's own launcher ---------------------------
# With SGLANG_OSCAR_CONFIG set, `python -m sglang.launch_server` loads the plugin without the OScaR
# launcher; the oscar backend's factory then judges the server's own arguments.
def _factory(monkeypatch, server_args):
    monkeypatch.setattr(config, "_current", OscarConfig())
    runner = types.SimpleNamespace(server_args=server_args, token_to_kv_pool=object())
    return lambda: plugin._make_backend(runner)


SGLANG_ONLY = [(f, m) for f, m in REFUSED if not any(x.startswith(("--oscar", "--page-size")) for x in f)]


@pytest.mark.parametrize("flags, message", SGLANG_ONLY, ids=[" ".join(f) for f, _ in SGLANG_ONLY])
def test_backend_factory_refuses_flags_the_launcher_refuses(llama, monkeypatch, flags, message):
    make = _factory(monkeypatch, parse_sglang_args(["--model-path", llama, "--page-size", "64",
                                                     "--attention-backend", "oscar", *flags]))
    with pytest.raises(RuntimeError) as e:
        make()
    assert str(e.value).startswith("sglang_oscar: ") and message in str(e.value)


@pytest.mark.parametrize("overrides, message", MODELS_REFUSED)
def test_backend_factory_refuses_models_the_launcher_refuses(tmp_path, monkeypatch, overrides, message):
    make = _factory(monkeypatch, parse_sglang_args(["--model-path", model_dir(tmp_path, **overrides)]))
    with pytest.raises(RuntimeError, match="sglang_oscar: .*" + message):
        make()


def test_backend_factory_refuses_sglangs_default_page_size(llama, monkeypatch):
    # SGLang's own launcher leaves page size 1; the packed pool is laid out in --oscar-page-size pages.
    make = _factory(monkeypatch, parse_sglang_args(["--model-path", llama, "--page-size", "1"]))
    with pytest.raises(RuntimeError, match="--page-size 1 differs from --oscar-page-size 64"):
        make()


def test_backend_factory_accepts_what_the_launcher_hands_sglang(llama, monkeypatch):
    class PastTheRefusals(Exception):
        pass

    def verify_hooks(runner):  # the factory's next step, which a fake runner cannot pass
        raise PastTheRefusals
    monkeypatch.setattr(plugin, "verify_hooks", verify_hooks)
    _, argv = resolve(["--model-path", llama])
    make = _factory(monkeypatch, parse_sglang_args(argv))
    with pytest.raises(PastTheRefusals):
        make()


def test_bf16_method_is_plain_sglang(tmp_path):
    cfg, argv = resolve(["--model-path", model_dir(tmp_path, head_dim=80), "--oscar-method", "bf16",
                         "--kv-cache-dtype", "fp8_e4m3", "--enable-lora"])
    args = parse_sglang_args(argv)
    assert not cfg.quantized and args.attention_backend != "oscar" and args.kv_cache_dtype == "fp8_e4m3"


def test_oscar_defaults_are_filled_in(llama):
    cfg, argv = resolve(["--model-path", llama, "--oscar-page-size", "128"])
    args = parse_sglang_args(argv)
    assert args.attention_backend == "oscar" and args.page_size == 128 and cfg.page_size == 128
    assert args.max_running_requests is not None


def test_user_values_are_kept_abbreviated_or_not(llama):
    _, argv = resolve(["--model-path", llama, "--max-running-req", "7", "--page-size", "128",
                       "--served-model-name", "mine"])
    args = parse_sglang_args(argv)
    assert args.max_running_requests == 7 and args.page_size == 128 and args.served_model_name == "mine"


def test_served_model_name_is_the_model_directory_name(tmp_path):
    (tmp_path / "My-Model-1B").mkdir()
    _, argv = resolve(["--model-path", model_dir(tmp_path / "My-Model-1B") + "/"])
    assert parse_sglang_args(argv).served_model_name == "My-Model-1B"


def test_refusal_is_one_clear_message_from_the_cli(llama):
    p = subprocess.run([sys.executable, "-m", "sglang_oscar.launch_server", "--model-path", llama,
                        "--speculative-algo", "EAGLE"], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        "sglang_oscar: error: speculative decoding (EAGLE) is not supported with OScaR "
        "(draft KV moves copy raw KV bytes)"]


@pytest.mark.parametrize("head_dim, graphs", [(64, True), (128, True), (256, False)])
def test_decode_graphs_only_for_head_dims_the_kernels_serve(tmp_path, monkeypatch, head_dim, graphs):
    # On a GPU the kernels serve, decode runs under CUDA graphs; a head_dim outside their matrix
    # decodes on the torch path, which cannot be captured, so the launcher leaves graphs off.
    from sglang_oscar import launch_server, ops
    monkeypatch.setattr(launch_server, "cuda_available", lambda: True)
    monkeypatch.setattr(ops, "unsupported_reason", lambda device=None: None)
    monkeypatch.delenv("SGLANG_OSCAR_DECODE", raising=False)
    _, argv = resolve(["--model-path", model_dir(tmp_path, head_dim=head_dim)])
    args = parse_sglang_args(argv)
    assert args.cuda_graph_backend_prefill == "disabled"
    assert (args.cuda_graph_backend_decode is None) == graphs, args.cuda_graph_backend_decode
