"""Helper processes of the fleet benchmark (:mod:`fleet_bench`): a real ``mooncake_master`` and SGLang's router
(``sglang_router.launch_router``), each in its own process group, logged to a file, ready when it answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 (127.0.0.1 only)
            return r.status == 200
    except OSError:
        return False


class Proc:
    """A helper process (Mooncake master or router) in its own process group, logged to a file."""

    def __init__(self, cmd: list[str], log: Path, ready: str, timeout: float = 120.0) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + timeout
        while not _ready(ready):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"{cmd[0]} not ready at {ready} (see {log})")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _ready(what: str) -> bool:
    if what.startswith("http"):
        return _http_ok(what)
    host, port = what.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def mooncake_master(log: Path) -> tuple[Proc, str]:
    binary = Path(sys.executable).parent / "mooncake_master"
    port, metrics = _port(), _port()
    cmd = [str(binary), "--rpc_port", str(port), "--rpc_address", "127.0.0.1", "--rpc_thread_num", "2",
           "--metrics_port", str(metrics), "--metrics_host", "127.0.0.1", "--enable_metric_reporting=false"]
    return Proc(cmd, log, f"127.0.0.1:{port}", 30.0), f"127.0.0.1:{port}"


def router(urls: list[str], policy: str, log: Path) -> tuple[Proc, str]:
    port = _port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *urls, "--policy", policy,
           "--health-check-timeout-secs", "120", "--health-failure-threshold", "1000"]  # a busy CPU answers late
    url = f"http://127.0.0.1:{port}"
    return Proc(cmd, log, url + "/readiness"), url  # the router's own answer: no request moves round robin
