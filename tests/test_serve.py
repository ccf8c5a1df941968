"""The Server harness: a start that hangs is retried on a fresh port, visibly; a start that exits is not."""
from __future__ import annotations

import pytest

from sglang_oscar import serve


def _scripted(monkeypatch, tmp_path, outcomes):
    """A Server whose starts return the scripted outcomes (True healthy, False hung, an exception)."""
    log = tmp_path / "server.log"
    log.write_text("line 1\nthe last line before the hang\n")
    s = serve.Server(["--oscar-method", "bf16"], log_path=log, attempts=2)
    ports = []

    def start_once(self):
        ports.append(self.port)
        out = outcomes.pop(0)
        if isinstance(out, Exception):
            raise out
        return out
    monkeypatch.setattr(serve.Server, "_start_once", start_once)
    return s, ports


def test_hung_start_is_retried_on_a_fresh_port_with_a_warning(monkeypatch, tmp_path):
    s, ports = _scripted(monkeypatch, tmp_path, [False, True])
    with pytest.warns(UserWarning, match="the last line before the hang"):
        assert s.start() is s
    assert len(ports) == 2 and ports[0] != ports[1]
    assert s.url.endswith(f":{ports[1]}") and s.args[s.args.index("--port") + 1] == str(ports[1])
    assert s.args[-2:] == ["--oscar-method", "bf16"]


def test_start_hung_every_time_raises_with_the_log_tail(monkeypatch, tmp_path):
    s, ports = _scripted(monkeypatch, tmp_path, [False, False])
    with pytest.warns(UserWarning), pytest.raises(TimeoutError, match="(?s)2 starts.*before the hang"):
        s.start()
    assert len(ports) == 2


def test_start_that_exits_is_not_retried(monkeypatch, tmp_path):
    s, ports = _scripted(monkeypatch, tmp_path, [RuntimeError("server exited with 1 during start-up"), True])
    with pytest.raises(RuntimeError, match="exited"):
        s.start()
    assert len(ports) == 1
