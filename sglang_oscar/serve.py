"""Start and stop a `sglang_oscar.launch_server` process from Python (tests, benchmarks)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():
    """Linux: SIGTERM the server when its parent dies (a killed test run must not leave servers behind)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort elsewhere
        pass


BIND_ERROR = "address already in use"   # uvicorn's message when the HTTP port is taken


class Server:
    """A launch_server subprocess on 127.0.0.1; `with Server([...]) as s: requests.get(s.url + ...)`.

    A start that is not healthy within `timeout` seconds, or whose HTTP port was taken before it could
    bind (a port free_port saw free can be taken by another server's internal ports meanwhile; SGLang
    then logs "address already in use" and hangs instead of exiting), is tried again on a fresh port, up
    to `attempts` starts in all. A retry warns with that start's log tail, so it stays visible; a server
    that exits during start-up is never retried.
    """

    def __init__(self, args, env=None, log_path=None, timeout=300, attempts=2):
        self.user_args = list(args)
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.timeout = timeout
        self.attempts = attempts
        self.proc = None
        self._place()

    def _place(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "sglang_oscar.launch_server", "--host", "127.0.0.1",
                     "--port", str(self.port), *self.user_args]

    def log_tail(self, lines=40) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return "(no log)"
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def start(self):
        for attempt in range(1, self.attempts + 1):
            if self._start_once():
                return self
            tail = self.log_tail()
            if attempt == self.attempts:
                raise TimeoutError(f"server not up after {self.attempts} starts (each at most {self.timeout}s); "
                                   f"last log lines:\n{tail}")
            why = "lost its port" if BIND_ERROR in tail else f"not healthy after {self.timeout}s"
            warnings.warn(f"server start {attempt} {why}, starting again on a fresh port; its last log "
                          f"lines:\n{tail}", stacklevel=2)
            self._place()

    def _start_once(self) -> bool:
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        # A new session, so stop() can end SGLang's whole process tree.
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} during start-up"
                                   + (f"; log: {self.log_path}\n{self.log_tail()}" if self.log_path else ""))
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return True
            except requests.RequestException:
                if BIND_ERROR in self.log_tail():
                    break
            time.sleep(1)
        self.stop()
        return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ---- small client helpers ------------------------------------------------------------------
    def info(self) -> dict:
        return requests.get(self.url + "/server_info", timeout=60).json()

    def oscar_state(self) -> dict:
        return self.info()["internal_states"][0]["oscar"]

    def generate(self, input_ids, max_new_tokens=16, **extra) -> dict:
        body = {"input_ids": input_ids, "sampling_params": {"max_new_tokens": max_new_tokens,
                                                            "temperature": 0, **extra.pop("sampling", {})}}
        body.update(extra)
        r = requests.post(self.url + "/generate", json=body, timeout=600)
        r.raise_for_status()
        return r.json()

    def chat(self, messages, max_tokens=32, **extra) -> dict:
        body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0, **extra}
        r = requests.post(self.url + "/v1/chat/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()

    def flush(self):
        requests.post(self.url + "/flush_cache", timeout=60).raise_for_status()

    def wait_idle(self, timeout=120):
        """Until the scheduler runs and queues nothing (aborted or abandoned requests finish)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            load = requests.get(self.url + "/v1/loads", timeout=60).json()["loads"][0]
            if load.get("num_running_reqs", 0) == 0 and load.get("num_waiting_reqs", 0) == 0:
                return
            time.sleep(0.5)
        raise TimeoutError(f"server still busy after {timeout} s")
