"""Helpers of the Mooncake tests: a real ``mooncake_master`` on a free loopback port, killable and restartable.

Import the fixture and marker in a test module: ``from mooncake_support import mooncake_master, requires_mooncake``
(``mooncake_master`` yields a running ``MooncakeMaster``; ``requires_mooncake`` skips when the wheel is absent;
``scripts/install.sh`` installs it, so CI runs these tests)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_TIMEOUT_S = 20.0


def master_binary() -> str | None:
    """The ``mooncake_master`` launcher of this venv (or on PATH); ``None`` without the Mooncake wheel."""
    local = Path(sys.executable).parent / "mooncake_master"
    if local.is_file():
        return str(local)
    return shutil.which("mooncake_master")


def _missing() -> str | None:
    if master_binary() is None:
        return "mooncake_master not found: pip install --no-deps mooncake-transfer-engine-non-cuda (scripts/install.sh)"
    try:
        import mooncake.store  # noqa: F401
    except ImportError as e:  # the wheel without libibverbs1 fails here
        return f"mooncake.store does not import ({e}): apt-get install libibverbs1"
    return None


MOONCAKE_MISSING = _missing()
requires_mooncake = pytest.mark.skipif(MOONCAKE_MISSING is not None, reason=MOONCAKE_MISSING or "")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class MooncakeMaster:
    """A ``mooncake_master`` subprocess on ``127.0.0.1:port`` (2 RPC threads, no metric reporting, its admin port
    free too); ``kill`` and ``start`` again keep the same port (fault tests)."""

    def __init__(self, log_path: Path) -> None:
        binary = master_binary()
        if binary is None:
            raise RuntimeError(f"mooncake_master: expected in {Path(sys.executable).parent} or on PATH, not found")
        self.binary = binary
        self.port = free_port()
        self.metrics_port = free_port()
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"mooncake_master already running (pid {self.proc.pid})")
        args = [self.binary, "--rpc_port", str(self.port), "--rpc_address", "127.0.0.1", "--rpc_thread_num", "2",
                "--metrics_port", str(self.metrics_port), "--metrics_host", "127.0.0.1",
                "--enable_metric_reporting=false"]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + START_TIMEOUT_S
        while not _accepts(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"mooncake_master exited with {self.proc.returncode}: {self.log_tail()}")
            if time.monotonic() > end:
                self.kill()
                raise RuntimeError(f"mooncake_master: no connection on {self.address} in {START_TIMEOUT_S} s")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL (a crash, not a clean shutdown) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


@pytest.fixture
def mooncake_master(tmp_path: Path) -> Iterator[MooncakeMaster]:
    """A running master for one test (killed at teardown)."""
    if MOONCAKE_MISSING is not None:
        pytest.skip(MOONCAKE_MISSING)
    master = MooncakeMaster(tmp_path / "mooncake_master.log")
    master.start()
    try:
        yield master
    finally:
        master.kill()
