"""The CUDA extension compiles with nvcc on a machine without a GPU (one cached build).

torch.utils.cpp_extension needs CUDA_HOME; the standard toolkit location is used when it is unset.
The build is cached (see sglang_oscar.ops), so later runs only load it.
"""
from __future__ import annotations

import os
import shutil
import time

import pytest


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if not home:
        nvcc = shutil.which("nvcc")
        home = os.path.dirname(os.path.dirname(nvcc)) if nvcc else "/usr/local/cuda"
    return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None


def test_extension_builds():
    home = _cuda_home()
    if home is None:
        pytest.skip("nvcc not found (set CUDA_HOME): the CUDA extension cannot be compiled here")
    try:
        import torch.utils.cpp_extension as ce
    except ImportError:
        pytest.skip("torch is not installed")
    os.environ["CUDA_HOME"] = home
    ce.CUDA_HOME = home  # torch reads it once at import
    from sglang_oscar import ops

    t0 = time.time()
    mod = ops.build()
    print(f"extension built/loaded from {ops.build_dir()} in {time.time() - t0:.0f} s")
    for name in ("store", "decode", "blocks_per_sm"):
        assert hasattr(mod, name)
