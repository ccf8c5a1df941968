"""The kernels' shape matrix is written twice: shapes.py (which shapes the Python side sends to the
kernels) and the bindings' check_shape (which shapes the compiled kernels accept). They must agree,
or a shape one side allows fails on the other at run time, on a GPU only."""
from __future__ import annotations

import pathlib
import re

from sglang_oscar import shapes

BINDINGS = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "bindings.cpp"


def check_shape_values() -> dict[str, tuple[int, ...]]:
    """Each check_shape parameter (page size, head_dim, bits, in signature order) -> the values its
    TORCH_CHECKs compare it with."""
    m = re.search(r"\bvoid\s+check_shape\s*\(([^)]*)\)\s*\{(.*?)\n\}", BINDINGS.read_text(), re.S)
    assert m, "check_shape(...) { ... } not found in csrc/bindings.cpp"
    params = [p.split()[-1] for p in m.group(1).split(",")]
    checks = re.findall(r"TORCH_CHECK\s*\(([^,]*),", m.group(2))
    values = {}
    for name in params:
        conds = [c for c in checks if re.search(rf"\b{name}\b", c)]
        assert len(conds) == 1, f"expected one TORCH_CHECK on {name}, got {conds}"
        # Only `name == N || name == N ...`: a range or other test would not be a list of shapes.
        assert re.fullmatch(rf"\s*{name}\s*==\s*\d+(\s*\|\|\s*{name}\s*==\s*\d+)*\s*", conds[0]), conds[0]
        values[name] = tuple(sorted(int(v) for v in re.findall(rf"\b{name}\s*==\s*(\d+)", conds[0])))
    return values


def test_bindings_check_shape_matches_shapes_py():
    values = check_shape_values()
    assert len(values) == 3, f"check_shape takes (page size, head_dim, bits), got {list(values)}"
    page_sizes, head_dims, bits = values.values()
    assert page_sizes == tuple(sorted(shapes.KERNEL_PAGE_SIZES))
    assert head_dims == tuple(sorted(shapes.KERNEL_HEAD_DIMS))
    assert bits == tuple(sorted(shapes.BITS))
