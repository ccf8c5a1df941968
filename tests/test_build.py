"""The CUDA extension compiles with nvcc on a machine without a GPU (one cached build).

The build finds the toolkit itself (sglang_oscar.toolkit): no CUDA_HOME needs to be set, and an
`nvcc` on PATH that is a wrapper outside the toolkit does not mislead it.
"""
from __future__ import annotations

import os
import time

import pytest

from sglang_oscar import toolkit


def _fake_toolkit(root, header=True):
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "bin" / "nvcc").chmod(0o755)
    if header:
        (root / "include").mkdir()
        (root / "include" / toolkit.HEADER).write_text("")
    return str(root)


def test_a_wrapper_nvcc_outside_the_toolkit_is_passed_over(tmp_path, monkeypatch):
    wrapper = _fake_toolkit(tmp_path / "wrapper", header=False)  # bin/nvcc, no CUDA headers
    real = _fake_toolkit(tmp_path / "cuda-12.4")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setenv("CUDA_PATH", real)
    monkeypatch.setenv("PATH", os.path.join(wrapper, "bin") + os.pathsep + os.environ["PATH"])
    assert toolkit.candidates()[:2] == [real, wrapper]
    assert not toolkit.is_toolkit(wrapper) and toolkit.find_cuda_home() == real
    monkeypatch.setenv("CUDA_HOME", wrapper)  # a wrong setting does not win either
    assert toolkit.find_cuda_home() == real


def test_extension_builds():
    if toolkit.find_cuda_home() is None:
        pytest.skip("no CUDA toolkit (bin/nvcc + include/cuda_runtime_api.h) found: set CUDA_HOME to one")
    try:
        import torch.utils.cpp_extension  # noqa: F401
    except ImportError:
        pytest.skip("torch is not installed")
    from sglang_oscar import ops

    t0 = time.time()
    mod = ops.build()
    print(f"extension built/loaded from {ops.build_dir()} in {time.time() - t0:.0f} s")
    for name in ("store", "decode", "blocks_per_sm"):
        assert hasattr(mod, name)
