"""The plugin's debug state and process-wide config, without a server."""
from __future__ import annotations

import ast
import hashlib
import pathlib
import types

import torch

from sglang_oscar import config, layout, plugin
from sglang_oscar.config import ENV, OscarConfig

PKG = pathlib.Path(plugin.__file__).parent


def _pool(num_pages=6, layers=2):
    g = torch.Generator().manual_seed(0)
    pages = []
    for _ in range(layers):
        layer = {}
        for f, (shape, dt) in layout.page_shapes(64, 3, 64, 2).items():
            x = torch.randint(-2**15, 2**15, (num_pages, *shape), generator=g, dtype=torch.int32)
            layer[f] = x if dt == torch.int32 else x.to(dt)
        pages.append(layer)
    return types.SimpleNamespace(pages=pages, num_pages=num_pages, device=torch.device("cpu"))


def _reference_digest(pool, page):
    h = hashlib.sha256()
    for layer in pool.pages:
        for f in sorted(layer):
            h.update(layer[f][page].numpy().tobytes())
    return h.hexdigest()[:16]


def test_page_digests_cover_in_use_pages_as_of_the_device_sync(monkeypatch):
    pool = _pool()
    alloc = types.SimpleNamespace(get_kvcache=lambda: pool, free_pages=torch.tensor([2, 5]),
                                  release_pages=torch.tensor([4]))

    def in_flight_write_lands(device):
        # What an overlapped batch still writing on the device has finished by the sync point.
        pool.pages[1]["v_codes"][3].fill_(7)
    monkeypatch.setattr(plugin, "_synchronize", in_flight_write_lands)
    got = plugin.page_digests(alloc)
    assert int(pool.pages[1]["v_codes"][3].flatten()[0]) == 7
    # page 0 is SGLang's padding page, 2 and 5 are free, 4 is staged for release
    assert got == {str(p): _reference_digest(pool, p) for p in (1, 3)}


def test_config_is_read_once_per_process(monkeypatch):
    monkeypatch.setattr(config, "_current", config._UNSET)
    monkeypatch.setenv(ENV, OscarConfig(bits=4).to_json())
    assert config.current() == OscarConfig(bits=4)
    monkeypatch.setenv(ENV, OscarConfig(bits=2, page_size=128).to_json())
    assert config.current() == OscarConfig(bits=4) == OscarConfig.from_env()
    config.set_current(OscarConfig(method="kivi"))  # the launcher: this process and its children
    assert config.current() == OscarConfig.from_json(config.os.environ[ENV]) == OscarConfig(method="kivi")


def _imports(path):
    """Modules of the package that `path` imports (from .x import y / from . import x)."""
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom) and n.level:
            out |= {n.module} if n.module else {a.name for a in n.names}
    return out


def test_plugin_is_imported_by_nothing_it_imports():
    # The plugin wires SGLang to the package; no module of the package reaches back into it.
    users = sorted(p.name for p in PKG.glob("*.py") if p.name != "launch_server.py" and "plugin" in _imports(p))
    assert users == []
