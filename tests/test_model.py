"""The default-model provider: one conversion, instant re-use, and a damaged cache never served."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from sglang_oscar import model as provider
from sglang_oscar.model import CACHE_ENV, MANIFEST, MODEL_NAME, ModelCacheError, default_model_path


def _copy_cache(src: str, root: Path, link_weights: bool = True) -> Path:
    """A cache root holding a copy of the converted model (weights hard-linked when not modified)."""
    dst = root / MODEL_NAME
    dst.mkdir(parents=True)
    for p in Path(src).iterdir():
        if link_weights and p.suffix == ".safetensors":
            try:
                os.link(p, dst / p.name)
                continue
            except OSError:
                pass  # another file system: copy instead
        shutil.copy2(p, dst / p.name)
    return dst


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture
def no_conversion(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("a valid cache must not be converted again")
    monkeypatch.setattr(provider, "_write_model", fail)


@pytest.fixture
def fake_conversion(monkeypatch, default_model_dir):
    """Stands in for the slow transformers step; the temp dir, manifest, checks and rename are real."""
    calls = []

    def write(out, src, progress):
        calls.append(out)
        for p in Path(default_model_dir).iterdir():
            if p.name != MANIFEST:
                shutil.copy2(p, out / p.name)
    monkeypatch.setattr(provider, "_write_model", write)
    return calls


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_env_var_cache_is_used_and_second_call_is_instant(cache, default_model_dir, no_conversion):
    final = _copy_cache(default_model_dir, cache)
    t = time.perf_counter()
    assert default_model_path() == str(final)
    assert default_model_path() == str(final)
    assert time.perf_counter() - t < 10  # two full checksum passes of ~270 MB, no conversion


def test_converted_model_is_bf16_with_chat_template(default_model_dir):
    import json
    cfg = json.loads((Path(default_model_dir) / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    assert "quantization_config" not in cfg
    assert (Path(default_model_dir) / "chat_template.jinja").is_file() or \
        "chat_template" in (Path(default_model_dir) / "tokenizer_config.json").read_text()
    provider.verify(Path(default_model_dir))


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "no_manifest"])
def test_damaged_cache_is_refused(cache, default_model_dir, no_conversion, damage):
    final = _copy_cache(default_model_dir, cache, link_weights=damage not in ("flip", "truncate"))
    weights = final / "model.safetensors"
    if damage == "flip":
        _flip_byte(weights, weights.stat().st_size // 2)
    elif damage == "truncate":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 1)
    elif damage == "missing":
        (final / "tokenizer.json").unlink()
    else:  # a directory that never got its manifest (not ours, or written by hand)
        (final / MANIFEST).unlink()
    expect = {"flip": "sha256", "truncate": "bytes", "missing": "tokenizer.json is missing",
              "no_manifest": MANIFEST}[damage]
    with pytest.raises(ModelCacheError, match=expect):
        default_model_path(rebuild=False)


def test_damaged_cache_is_rebuilt(cache, default_model_dir, fake_conversion):
    final = _copy_cache(default_model_dir, cache, link_weights=False)
    _flip_byte(final / "model.safetensors", 12345)
    assert default_model_path() == str(final)
    assert len(fake_conversion) == 1
    provider.verify(final)
    assert sorted(p.name for p in cache.iterdir()) == sorted([MODEL_NAME, f".{MODEL_NAME}.lock"])
    assert default_model_path() == str(final) and len(fake_conversion) == 1


def test_interrupted_conversion_leaves_nothing_half_written(cache, monkeypatch, fake_conversion):
    # A conversion killed earlier left its temp dir behind.
    cache.mkdir()
    stale = cache / f".{MODEL_NAME}.tmp-dead"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")

    def crash(out, src, progress):
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    real = provider._write_model
    monkeypatch.setattr(provider, "_write_model", crash)
    with pytest.raises(KeyboardInterrupt):
        default_model_path()
    assert not (cache / MODEL_NAME).exists()
    assert not any(p.name.startswith(f".{MODEL_NAME}.tmp-") for p in cache.iterdir())
    monkeypatch.setattr(provider, "_write_model", real)  # the fake copy again
    assert Path(default_model_path()).is_dir() and len(fake_conversion) == 1


def test_default_model_answers_paris(load_default_model):
    model, tok = load_default_model()
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
