"""Where the CUDA toolkit is, for building the extension.

torch.utils.cpp_extension takes $CUDA_HOME, else the directory above the `nvcc` on PATH, else
/usr/local/cuda. The `nvcc` on PATH may be a wrapper script outside the toolkit (its parent then has
no CUDA headers), so candidates are checked for what the build needs: bin/nvcc and the runtime header.
"""
from __future__ import annotations

import glob
import os
import shutil

HEADER = "cuda_runtime_api.h"


def is_toolkit(path: str | None) -> bool:
    if not path:
        return False
    include = [os.path.join(path, "include")] + glob.glob(os.path.join(path, "targets", "*", "include"))
    return os.path.isfile(os.path.join(path, "bin", "nvcc")) and any(
        os.path.isfile(os.path.join(d, HEADER)) for d in include)


def candidates() -> list[str]:
    """Toolkit locations in order of preference: the user's setting, the nvcc on PATH (its real
    location, through links), then the standard install directories, newest version first."""
    out = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        out.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    out.append("/usr/local/cuda")
    versions = glob.glob("/usr/local/cuda-*")
    out += sorted(versions, key=lambda p: [int(x) if x.isdigit() else 0
                                           for x in p.rsplit("-", 1)[1].split(".")], reverse=True)
    seen, result = set(), []
    for p in out:
        if p and p not in seen:
            seen.add(p)
            result.append(p)
    return result


def find_cuda_home() -> str | None:
    """The first candidate that is a whole toolkit (nvcc and the CUDA runtime header), or None."""
    return next((p for p in candidates() if is_toolkit(p)), None)


def use_cuda_home() -> str | None:
    """Point torch's extension builder (which fixed its choice at import) at a whole toolkit; with
    none found, torch's own choice stays (and its build error names what is missing)."""
    home = find_cuda_home()
    if home is not None:
        import torch.utils.cpp_extension as ce
        os.environ["CUDA_HOME"] = home
        ce.CUDA_HOME = home
    return home
