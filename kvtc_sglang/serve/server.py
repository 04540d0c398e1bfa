"""Run one SGLang server as a context manager: free port on 127.0.0.1, bounded start-up, log to a file,
process group always terminated (normal exit, error, Ctrl-C).

    with SGLangServer(ServerSpec("kvtc", model_path, calibration), log_path=Path("out/kvtc.log")) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

from .launcher import ServerSpec, server_command, server_env

HOST = "127.0.0.1"
TREE_CACHE_LINE = "Tree cache initialized: source=registered('kvtc') impl=KVTCRadixCache"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    """The server exited or did not become healthy in time; the message carries the log's tail."""


class SGLangServer:
    """A stock ``sglang.launch_server`` process for ``spec`` (see :mod:`.launcher`).

    Args:
        spec: backend, model, calibration, CPU/GPU, extra SGLang flags.
        log_path: the server's stdout and stderr go here.
        start_timeout: seconds to wait for ``/health`` before giving up (the process group is then killed).
        env: extra environment variables for the server.
    """

    def __init__(self, spec: ServerSpec, log_path: Path, *, start_timeout: float = 300.0,
                 env: dict[str, str] | None = None) -> None:
        self.spec = spec
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.env = server_env(spec)
        self.env.update(env or {})
        self.cmd = server_command(spec, HOST, self.port)
        self.proc: subprocess.Popen | None = None

    # ----- lifecycle -----

    def start(self) -> SGLangServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.get("/health", timeout=5.0)[0] == 200:
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(1.0)
        raise ServerStartError(f"server not healthy after {self.start_timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGKILL the server's process group (server, scheduler, detokenizer); returns the exit code.

        No SIGTERM first: SGLang's SIGTERM path costs about 5 s per server and serves nothing here (the
        group's SIGTERM reaches the scheduler first, which the server takes for a crash and answers with
        5 s of crash diagnostics; a SIGTERM to the server alone drains for as long). Everything a test or
        benchmark reads (``/metrics``, the log, each process's own lines) is written before the stop.
        """
        if self.proc is None:
            return None
        _signal_group(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        return self.proc.returncode

    def __enter__(self) -> SGLangServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # ----- HTTP and log helpers -----

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, str]:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:  # noqa: S310 (127.0.0.1 only)
            return r.status, r.read().decode()

    def post(self, path: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, str]:
        data = json.dumps(body or {}).encode()
        req = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 (127.0.0.1 only)
            return r.status, r.read().decode()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.is_file() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
