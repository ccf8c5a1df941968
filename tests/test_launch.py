"""Start-up refusals (design invariant 6): one clear message, before SGLang loads anything."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sglang_oscar.launch_server import LaunchError, resolve

LLAMA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_attention_heads": 9,
         "num_key_value_heads": 3}


def model_dir(tmp_path, **overrides):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, **overrides}))
    return str(tmp_path)


@pytest.fixture
def llama(tmp_path):
    return model_dir(tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--kv-cache-dtype", "fp8_e4m3"], "--kv-cache-dtype fp8_e4m3 cannot be combined"),
    (["--attention-backend", "flashinfer"], "--attention-backend flashinfer cannot be combined"),
    (["--speculative-algorithm", "EAGLE"], "speculative decoding"),
    (["--enable-hierarchical-cache"], "--enable-hierarchical-cache is not supported"),
    (["--disaggregation-mode", "prefill"], "PD disaggregation"),
    (["--enable-kv-cache-sharding"], "--enable-kv-cache-sharding is not supported"),
    (["--enable-unified-memory"], "--enable-unified-memory is not supported"),
    (["--dcp-size", "2"], "decode context parallelism"),
    (["--oscar-page-size", "128", "--page-size", "64"], "differs from --oscar-page-size"),
    (["--page-size", "16"], "multiple of the 32-token K group"),
    (["--oscar-page-size", "48"], "multiple of the 32-token K group"),
    (["--oscar-bits", "3"], "invalid choice"),
])
def test_incompatible_flags_are_refused(llama, flags, message, capsys):
    with pytest.raises((LaunchError, SystemExit)) as e:
        resolve(["--model-path", llama, *flags])
    assert message in str(e.value) + capsys.readouterr().err


@pytest.mark.parametrize("overrides, message", [
    ({"kv_lora_rank": 512, "architectures": ["DeepseekV3ForCausalLM"]}, "MLA models are not supported"),
    ({"architectures": ["GPT2LMHeadModel"]}, "is not supported"),
    ({"head_dim": 80}, "head_dim 80 is not a power of two"),
    ({"use_sliding_window": True, "architectures": ["Qwen2ForCausalLM"]}, "sliding-window"),
])
def test_unsupported_models_are_refused(tmp_path, overrides, message):
    with pytest.raises(LaunchError, match=message):
        resolve(["--model-path", model_dir(tmp_path, **overrides)])


def test_bf16_method_skips_oscar_checks(tmp_path):
    cfg, argv = resolve(["--model-path", model_dir(tmp_path, head_dim=80), "--oscar-method", "bf16",
                         "--kv-cache-dtype", "fp8_e4m3"])
    assert not cfg.quantized and "oscar" not in argv


def test_oscar_defaults_are_filled_in(llama):
    cfg, argv = resolve(["--model-path", llama, "--oscar-page-size", "128"])
    assert argv[argv.index("--attention-backend") + 1] == "oscar"
    assert argv[argv.index("--page-size") + 1] == "128" and cfg.page_size == 128
    assert "--max-running-requests" in argv


def test_refusal_is_one_clear_message_from_the_cli(llama):
    p = subprocess.run([sys.executable, "-m", "sglang_oscar.launch_server", "--model-path", llama,
                        "--speculative-algorithm", "EAGLE"], capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines() == [
        "sglang_oscar: error: speculative decoding (--speculative-algorithm) is not supported with OScaR "
        "(draft KV moves copy raw KV bytes)"]
