"""The Server harness: a start that hangs or loses its port is retried on a fresh port, visibly; a start
that exits is not."""
from __future__ import annotations

import sys
import time

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


def test_start_that_lost_its_port_is_retried_at_once(monkeypatch, tmp_path):
    # what SGLang's HTTP server logs, then hangs, when its port was taken after free_port saw it free
    fake = [sys.executable, "-c", "import time; print('ERROR:    [Errno 98] error while attempting to bind on "
            "address (127.0.0.1, 1): address already in use', flush=True); time.sleep(120)"]
    places = []

    def place(self):
        places.append(1)
        self.port = serve.free_port()
        self.url, self.args = f"http://127.0.0.1:{self.port}", fake
    monkeypatch.setattr(serve.Server, "_place", place)
    s = serve.Server([], log_path=tmp_path / "server.log", timeout=100, attempts=2)
    t = time.time()
    with pytest.warns(UserWarning, match="lost its port"), \
            pytest.raises(TimeoutError, match="(?s)2 starts.*address already in use"):
        s.start()
    assert time.time() - t < 60 and len(places) == 2      # not the 100 s timeout, twice
    assert s.proc.poll() is not None                      # the hung process was stopped
