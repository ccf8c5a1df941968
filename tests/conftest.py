"""Shared fixtures: the embedded default model, converted once (into the user's cache) per session."""
from __future__ import annotations

import pytest
import torch

# One thread: on small shared CPU machines OpenMP's spinning threads stall each other (a 16-token
# generate took minutes with 2 threads under load, seconds with 1).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def default_model_dir():
    from sglang_oscar.model import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def load_default_model(default_model_dir):
    """Factory: a fresh bf16 (or given dtype) copy of the default model, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)

    def load(dtype=torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=dtype).eval()
        return model, tok
    return load


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failure, append the tail of each server log the test used, so CI output shows the cause."""
    outcome = yield
    rep = outcome.get_result()
    if not rep.failed:
        return
    from pathlib import Path
    for name in getattr(item, "fixturenames", ()):
        path = getattr(item.funcargs.get(name) if hasattr(item, "funcargs") else None, "log_path", None)
        if path and Path(path).exists():
            tail = Path(path).read_text(errors="replace").splitlines()[-60:]
            rep.sections.append((f"server log tail ({name}: {path})", "\n".join(tail)))
