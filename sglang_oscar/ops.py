"""Loader of the CUDA extension (csrc/, libs/hadacore): JIT-built on first use, then cached.

The build goes through torch.utils.cpp_extension.load, for the GPU it runs on (target_arch: sm_90a
on Hopper, whose decode kernel streams pages by bulk async copies; sm_80/86/89 by cp.async; sm_100),
or for $SGLANG_OSCAR_ARCH (e.g. 80: PTX of that architecture, which a newer GPU runs by JIT, so the
sm_80 code path can be tested on a Hopper). On a machine without a GPU the build targets sm_90a.
The build directory is $SGLANG_OSCAR_BUILD_DIR, else <user cache>/sglang_oscar/ext-<hash of sources
and flags>, so a changed source or target rebuilds and an unchanged one loads in a second. `available()` is False without a CUDA device or on a GPU the kernels are not
built for (shapes.KERNEL_ARCHS); `load()` raises with the reason (`unsupported_reason`).
The sources are found beside the package in a source checkout, or under $SGLANG_OSCAR_SRC (a
checkout's root) when the package was installed from a wheel, which carries no C++ sources.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import threading

logger = logging.getLogger(__name__)

_ROOT = pathlib.Path(os.environ.get("SGLANG_OSCAR_SRC") or pathlib.Path(__file__).resolve().parent.parent)
CSRC = _ROOT / "csrc"
LIBS = _ROOT / "libs"
SOURCES = ("bindings.cpp", "store.cu", "decode.cu", "extend.cu", "dequant.cu", "scratch.cu")
HEADERS = ("csrc/common.cuh", "csrc/query.cuh", "csrc/kernels.h", "libs/hadacore/hadacore.cuh")
NAME = "sglang_oscar_ext"
BASE_FLAGS = ["-O3", "-std=c++17", "-diag-suppress", "550", "--expt-relaxed-constexpr"]

_lock = threading.Lock()
_mod = None


def target_arch() -> str:
    """The architecture the build targets: $SGLANG_OSCAR_ARCH, else the current GPU's (90 -> 90a,
    whose arch-specific form the Hopper build has always used), else 90a on a machine without one."""
    env = os.environ.get("SGLANG_OSCAR_ARCH", "").strip().lower().removeprefix("sm_")
    if env:
        if not env.rstrip("a").isdigit():
            raise ValueError(f"SGLANG_OSCAR_ARCH={env!r}: give a compute capability such as 80, 86, 89, 90a or 100")
        return env
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return "90a" if (major, minor) == (9, 0) else f"{major}{minor}"
    return "90a"


def cuda_flags(arch: str | None = None) -> list[str]:
    """nvcc flags for `arch`: machine code for it, or PTX only when $SGLANG_OSCAR_ARCH chose it."""
    arch = arch or target_arch()
    code = f"compute_{arch}" if os.environ.get("SGLANG_OSCAR_ARCH") else f"sm_{arch}"
    return BASE_FLAGS + ["-gencode", f"arch=compute_{arch},code={code}"]


def _digest(flags: list[str]) -> str:
    h = hashlib.sha256()
    for rel in [f"csrc/{s}" for s in SOURCES] + list(HEADERS):
        h.update(rel.encode())
        h.update((_ROOT / rel).read_bytes())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:16]


def build_dir() -> pathlib.Path:
    env = os.environ.get("SGLANG_OSCAR_BUILD_DIR")
    if env:
        d = pathlib.Path(env)
    else:
        cache = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache"))
        d = cache / "sglang_oscar" / f"ext-{_digest(cuda_flags())}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension; works without a GPU if nvcc is present."""
    global _mod
    with _lock:
        if _mod is not None:
            return _mod
        if not CSRC.is_dir():
            raise RuntimeError(f"sglang_oscar CUDA sources not found at {CSRC} (install from a source checkout, or set SGLANG_OSCAR_SRC to one)")
        from torch.utils.cpp_extension import load

        from .toolkit import use_cuda_home
        use_cuda_home()  # the nvcc on PATH may be a wrapper outside the toolkit
        d = build_dir()
        flags = cuda_flags()
        logger.warning("sglang_oscar: loading the CUDA kernels (first use compiles them for %s, "
                       "a few minutes; cached in %s)", flags[-1], d)
        _mod = load(
            name=NAME,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_include_paths=[str(CSRC), str(LIBS)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=flags,
            build_directory=str(d),
            verbose=verbose,
        )
        return _mod


def unsupported_reason(device=None) -> str | None:
    """Why the kernels cannot run on `device` (default: the current CUDA device); None if they can
    (they may still need compiling on first use)."""
    try:
        import torch
    except Exception:  # noqa: BLE001 - any import problem means no kernels
        return "torch cannot be imported"
    from .shapes import KERNEL_ARCHS, arch_supported

    if not torch.cuda.is_available():
        return "this machine (no CUDA device)"
    cap = tuple(torch.cuda.get_device_capability(device))
    if not arch_supported(cap):
        built = ", ".join(f"sm_{a}{b}" for a, b in KERNEL_ARCHS)
        return f"this GPU (compute capability {cap[0]}.{cap[1]}; the kernels are built for {built})"
    return None


def available(device=None) -> bool:
    """True when the kernels can run on `device` (default: the current CUDA device)."""
    return unsupported_reason(device) is None


def load():
    reason = unsupported_reason()
    if reason:
        raise RuntimeError(f"sglang_oscar CUDA kernels cannot run on {reason} (use the torch reference path)")
    return build()


def torch_path_reason(cfg, head_dim: int | None = None, device=None) -> str | None:
    """Why attention would run on the torch path on this CUDA machine (None: on the kernels, so
    decode can run under CUDA graphs): forced by SGLANG_OSCAR_DECODE=torch, another GPU, or a shape
    outside the kernels' matrix (head_dim None: not checked)."""
    from .shapes import kernel_problem

    if os.environ.get("SGLANG_OSCAR_DECODE", "").lower() == "torch":
        return "SGLANG_OSCAR_DECODE=torch"
    return unsupported_reason(device) or kernel_problem(cfg.page_size, head_dim or 128, cfg.bits)
