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


def test_sm80_code_path_compiles_without_spills(tmp_path):
    """The sm_80-89 build (cp.async instead of bulk copies, mbarrier test_wait): every kernel compiles
    for sm_80 with no register spills, and the decode kernel takes the cp.async path there and the bulk
    copies on sm_90a."""
    import re
    import subprocess

    from sglang_oscar import ops

    home = toolkit.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit (bin/nvcc + include/cuda_runtime_api.h) found: set CUDA_HOME to one")
    nvcc = os.path.join(home, "bin", "nvcc")
    inc = ["-I", str(ops.CSRC), "-I", str(ops.LIBS)]

    def ptx(arch):
        out = tmp_path / f"decode_{arch}.ptx"
        subprocess.run([nvcc, *ops.cuda_flags(arch), *inc, "-ptx", str(ops.CSRC / "decode.cu"), "-o", str(out)],
                       check=True, capture_output=True, text=True)
        return out.read_text()

    p80, p90 = ptx("80"), ptx("90a")
    assert "cp.async.mbarrier.arrive.noinc" in p80 and "mbarrier.test_wait" in p80
    assert "cp.async.bulk" not in p80 and "expect_tx" not in p80 and "fence.mbarrier_init" not in p80
    assert "cp.async.bulk" in p90 and "mbarrier.try_wait" in p90
    kernels = 0
    for src in [s for s in ops.SOURCES if s.endswith(".cu")]:
        r = subprocess.run([nvcc, *ops.cuda_flags("80"), *inc, "-Xptxas", "-v", "-c", str(ops.CSRC / src),
                            "-o", str(tmp_path / (src + ".o"))], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-3000:]
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", r.stderr)
        assert spills and all(s == ("0", "0") for s in spills), (src, spills)
        kernels += len(spills)
    assert kernels >= 3 * 8   # decode, store, extend: every (dtype, head_dim, bits) instantiation
