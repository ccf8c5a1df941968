"""Start-up refusals (design invariant 6): one clear message, before SGLang loads anything.

Every check reads SGLang's own parse of the arguments, so abbreviations and `--config` files cannot
slip past them.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache is not supported with OScaR: HiCache"),
    (["--enable-hierarchical"], "--enable-hierarchical-cache is not supported"),
    (["--hicache-storage-backend", "file"], "--hicache-storage-backend file is not supported"),
    (["--enable-hisparse"], "--enable-hisparse is not supported"),
    (["--enable-lmcache"], "--enable-lmcache is not supported"),
    (["--enable-flexkv"], "--enable-flexkv is not supported"),
    (["--disaggregation-mode", "prefill"], "PD disaggregation"),
    (["--disaggregation-mode", "decode"], "PD disaggregation"),
    (["--enable-kv-cache-sharding"], "--enable-kv-cache-sharding is not supported"),
    (["--enable-unified-memory"], "--enable-unified-memory is not supported"),
    (["--enable-page-major-kv-layout"], "--enable-page-major-kv-layout is not supported"),
    (["--enable-dp-attention", "--dp-size", "2"], "DP attention"),
    (["--attn-dp-size", "2"], "DP attention"),
    (["--dcp-size", "2"], "decode context parallelism"),
    (["--attn-cp-size", "2"], "context parallelism splits"),
    (["--enable-lora"], "--enable-lora is not supported with OScaR: the V rotation is folded"),
    (["--lora-paths", "a=/tmp/adapter"], LORA),
    (["--enable-memory-saver"], "--enable-memory-saver is not supported"),
    (["--dtype", "float32"], "--dtype float32 is not supported"),
    (["--dtype", "float"], "--dtype float is not supported"),
    (["--enable-streaming-session"], "--enable-streaming-session is not supported"),
    (["--enable-session-radix-cache"], "--enable-session-radix-cache is not supported"),
    (["--quantization", "fp8"], "--quantization fp8 is not supported"),
    (["--kv-canary-real-data", "all"], "the KV canary reads raw K/V bytes"),
    (["--oscar-page-size", "128", "--page-size", "64"], "differs from --oscar-page-size"),
    (["--page-size", "16"], "multiple of the 32-token K group"),
    (["--oscar-page-size", "48"], "multiple of the 32-token K group"),
]


@pytest.mark.parametrize("flags, message", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_incompatible_flags_are_refused(llama, flags, message):
    with pytest.raises(LaunchError) as e:
        resolve(["--model-path", llama, *flags])
    assert message in str(e.value)


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


@pytest.mark.parametrize("overrides, message", [
    ({"kv_lora_rank": 512, "architectures": ["DeepseekV3ForCausalLM"]}, "MLA models are not supported"),
    ({"architectures": ["GPT2LMHeadModel"]}, "is not supported"),
    ({"head_dim": 80}, "head_dim 80 is not a power of two"),
    ({"use_sliding_window": True, "architectures": ["Qwen2ForCausalLM"]}, "sliding-window"),
    ({"quantization_config": {"quant_method": "awq"}}, r"quantized weights \(awq\)"),
])
def test_unsupported_models_are_refused(tmp_path, overrides, message):
    with pytest.raises(LaunchError, match=message):
        resolve(["--model-path", model_dir(tmp_path, **overrides)])


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
