"""L3 backends (a directory, a real Mooncake master) and the asynchronous client (queue, deadlines, counters)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from mooncake_support import MooncakeMaster, mooncake_master, requires_mooncake  # noqa: F401

from kvtc_sglang.tiers.l3 import DirectoryBackend, L3Backend, backend_from_config
from kvtc_sglang.tiers.l3_client import L3Client

K = [f"kvtc-00-{i:064x}" for i in range(8)]


class DictBackend(L3Backend):
    """In-memory store; ``gate`` (when set) makes every call wait on it: a hung network call."""

    name = "dict"

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.gate = gate
        self.calls = 0

    def _wait(self) -> None:
        self.calls += 1
        if self.gate is not None:
            self.gate.wait()

    def exists(self, keys: list[str]) -> list[bool]:
        self._wait()
        return [k in self.objects for k in keys]

    def get(self, key: str) -> bytes | None:
        self._wait()
        return self.objects.get(key)

    def put(self, key: str, data: bytes) -> bool:
        self._wait()
        self.objects[key] = data
        return True

    def close(self) -> None:
        pass


def wait_results(client: L3Client, n: int, limit_s: float = 10.0) -> list:
    out: list = []
    end = time.monotonic() + limit_s
    while len(out) < n and time.monotonic() < end:
        out += client.poll()
        time.sleep(0.005)
    return out


# ---- directory


def test_directory_round_trip_and_restart(tmp_path: Path) -> None:
    d = DirectoryBackend(tmp_path / "l3")
    assert d.put(K[0], b"zero") and d.put(K[1], b"one")
    assert d.put(K[0], b"zero")  # content-addressed: already there
    assert d.get(K[0]) == b"zero" and d.get(K[2]) is None
    assert d.exists(K[:3]) == [True, True, False]
    d.close()
    again = DirectoryBackend(tmp_path / "l3")  # a restarted replica finds the objects
    assert again.get(K[1]) == b"one" and again.used_bytes == 7
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "l3").rglob("*"))


def test_directory_full_evicts_oldest_or_refuses(tmp_path: Path) -> None:
    d = DirectoryBackend(tmp_path / "e", max_bytes=300)
    for i in range(3):
        assert d.put(K[i], bytes([i]) * 100)
        os.utime(d._path(K[i]), (1000 + i, 1000 + i))
    assert d.get(K[0]) is not None  # read: now the most recent
    assert d.put(K[3], b"x" * 100)
    assert d.exists(K[:4]) == [True, False, True, True] and d.used_bytes <= 300
    assert not d.put(K[4], b"x" * 301)  # never fits
    r = DirectoryBackend(tmp_path / "r", max_bytes=250, when_full="refuse")
    assert r.put(K[0], b"a" * 200) and not r.put(K[1], b"b" * 100)
    assert r.exists(K[:2]) == [True, False]


def test_factory_and_bad_arguments(tmp_path: Path) -> None:
    d = backend_from_config("directory", {"path": str(tmp_path), "max_bytes": "1mb"})
    assert isinstance(d, DirectoryBackend) and d.max_bytes == 1 << 20
    with pytest.raises(ValueError, match="expected one of"):
        backend_from_config("hf3fs", {})
    with pytest.raises(ValueError, match=r"unknown keys \['size'\]"):
        backend_from_config("directory", {"path": str(tmp_path), "size": 1})
    with pytest.raises(ValueError, match="master_server_address"):
        backend_from_config("mooncake", {"protocol": "tcp"})
    with pytest.raises(ValueError, match="global_segment_size"):
        backend_from_config("mooncake", {"master_server_address": "127.0.0.1:1", "global_segment_size": "lots"})
    with pytest.raises(ValueError, match="key"):
        d.put("../escape", b"x")
    with pytest.raises(ValueError, match="data"):
        d.put(K[0], b"")


# ---- Mooncake, against a real master


def mooncake(master: MooncakeMaster) -> L3Backend:
    return backend_from_config("mooncake", {"master_server_address": master.address, "protocol": "tcp",
                                            "global_segment_size": 16 << 20, "local_buffer_size": "16mb"})  # fmt: skip


@requires_mooncake
def test_mooncake_round_trip_two_replicas(mooncake_master: MooncakeMaster) -> None:  # noqa: F811
    a, b = mooncake(mooncake_master), mooncake(mooncake_master)
    try:
        assert a.put(K[0], b"from a" * 1000) and b.put(K[1], b"from b")
        assert b.get(K[0]) == b"from a" * 1000 and a.get(K[1]) == b"from b"
        assert a.exists(K[:3]) == [True, True, False] and a.get(K[2]) is None
        assert not a.put(K[3], b"x" * (17 << 20))  # larger than the local buffer: refused, no exception
    finally:
        a.close()
        b.close()


@requires_mooncake
def test_mooncake_master_killed_and_restarted(mooncake_master: MooncakeMaster) -> None:  # noqa: F811
    store = mooncake(mooncake_master)
    client = L3Client(store, timeout_s=0.5)
    try:
        assert store.put(K[0], b"before")
        mooncake_master.kill()
        timings = {}
        for name, call, miss in [("get", lambda: store.get(K[0]), None), ("exists", lambda: store.exists(K[:2]),
                                 [False, False]), ("put", lambda: store.put(K[1], b"during"), False)]:  # fmt: skip
            t0 = time.monotonic()
            assert call() == miss, name
            timings[name] = time.monotonic() - t0
        print("dead master:", {k: round(v, 3) for k, v in timings.items()})
        assert max(timings.values()) < 15.0, timings  # measured: ~0 s, ~0 s, ~4.4 s
        # the client never waits on it: put_async returns at once, the prefetch ends at its deadline
        t0 = time.monotonic()
        assert client.put_async(K[2], b"queued")
        client.lookup("r1", K[:2])
        results = wait_results(client, 1)
        assert time.monotonic() - t0 < 3.0 and [r.request_id for r in results] == ["r1"]
        assert results[0].objects == []
        mooncake_master.start()  # same port: the client reconnects by itself, earlier objects are gone
        end = time.monotonic() + 30
        while not store.put(K[3], b"after") and time.monotonic() < end:
            time.sleep(0.2)
        print(f"puts work again {time.monotonic() - end + 30:.1f} s after the restart")
        assert store.get(K[3]) == b"after"
        mooncake_master.kill()  # closing against a dead master blocks Mooncake ~2 s, its destructor ~10 s
    finally:
        t0 = time.monotonic()
        client.close()
        print(f"close {time.monotonic() - t0:.1f} s")
        assert time.monotonic() - t0 < 6.0


# ---- the client


def test_client_round_trip_and_counters() -> None:
    backend = DictBackend()
    client = L3Client(backend)
    try:
        for i in range(3):
            assert client.put_async(K[i], bytes([i]) * 10)
        assert client.flush(5.0)
        client.lookup("req", K[:5])
        (r,) = wait_results(client, 1)
        assert (r.request_id, r.keys, r.timed_out) == ("req", K[:3], False)
        assert r.objects == [bytes([i]) * 10 for i in range(3)]
        c = client.counters
        assert (c.put_objects, c.put_bytes, c.get_objects, c.get_bytes, c.get_misses) == (3, 30, 3, 30, 2)
        assert c.put_dropped == c.put_failed == c.get_errors == c.prefetch_timeouts == 0
        client.lookup("gone", K[:1])
        assert client.cancel("gone") and not client.cancel("gone")
        with pytest.raises(ValueError, match="already has a prefetch"):
            client.lookup("twice", [])
            client.lookup("twice", [])
    finally:
        client.close()


def test_client_drops_writes_when_queue_full() -> None:
    gate = threading.Event()
    client = L3Client(DictBackend(gate), write_queue_depth=2)
    try:
        results = [client.put_async(K[i], b"data") for i in range(6)]
        t0 = time.monotonic()
        assert not client.put_async(K[7], b"data")  # does not wait for room
        assert time.monotonic() - t0 < 0.05
        # one write is inside the hung put (or about to be), the queue holds two: the rest are dropped
        assert results[:2] == [True, True] and not all(results)
        assert client.counters.put_dropped == 7 - sum(results)
        gate.set()
        assert client.flush(5.0) and client.counters.put_objects == sum(results)
    finally:
        gate.set()
        client.close()


def test_prefetch_deadline_with_hung_backend() -> None:
    gate = threading.Event()
    backend = DictBackend(gate)
    backend.objects = {k: b"obj" for k in K}
    client = L3Client(backend, timeout_s=0.3, readers=1, close_timeout_s=0.5)
    try:
        client.lookup("a", K[:4])
        client.lookup("b", K[:2])  # queued behind the hung reader
        t0 = time.monotonic()
        assert client.poll() == []
        assert time.monotonic() - t0 < 0.05  # poll does not wait on the backend
        assert client.put_async(K[0], b"x")  # nor does put_async
        results = wait_results(client, 2, limit_s=5.0)
        elapsed = time.monotonic() - t0
        assert sorted(r.request_id for r in results) == ["a", "b"] and elapsed < 2.0
        assert all(r.timed_out and r.objects == [] and r.keys == [] for r in results)
        assert client.counters.prefetch_timeouts == 2
    finally:
        t0 = time.monotonic()
        client.close()  # the reader and writer are stuck in the backend: close is still bounded
        assert time.monotonic() - t0 < 1.0
        gate.set()
