"""L3 object frames: round trip, and every way an object must be refused, with its reason."""

from __future__ import annotations

import os

import pytest

from kvtc_sglang.tiers.frame import HEADER_BYTES, MAC_BYTES, FrameError, object_nbytes, pack_object, unpack_object

KEY = "kvtc-0123456789abcdef-" + "ab" * 32
OTHER_KEY = "kvtc-0123456789abcdef-" + "cd" * 32
DIGEST = "0123456789abcdef"
SECRET = b"fleet-secret"
WHERE = dict(key=KEY, digest=DIGEST, start=64, num_tokens=32)


def pack(payload: bytes = b"payload bytes", secret: bytes | None = None, **over) -> bytes:
    return pack_object(payload, **{**WHERE, **over}, secret=secret)


def reason(data: bytes, secret: bytes | None = None, **over) -> str:
    with pytest.raises(FrameError) as e:
        unpack_object(data, **{**WHERE, **over}, secret=secret)
    assert isinstance(e.value, ValueError)
    return e.value.reason


@pytest.mark.parametrize("secret", [None, SECRET])
@pytest.mark.parametrize("size", [0, 1, 1000, 1 << 20])
def test_round_trip(secret: bytes | None, size: int) -> None:
    payload = os.urandom(size)
    data = pack(payload, secret)
    assert len(data) <= object_nbytes(size)
    assert len(data) == HEADER_BYTES + size + (MAC_BYTES if secret else 0)
    assert unpack_object(data, **WHERE, secret=secret) == payload
    assert unpack_object(memoryview(data), **WHERE, secret=secret) == payload


def test_object_with_mac_accepted_without_secret() -> None:
    assert unpack_object(pack(secret=SECRET), **WHERE, secret=None) == b"payload bytes"


@pytest.mark.parametrize("secret", [None, SECRET])
def test_truncated(secret: bytes | None) -> None:
    data = pack(b"x" * 100, secret)
    for cut in (0, 1, 3, HEADER_BYTES - 1, HEADER_BYTES, HEADER_BYTES + 50, len(data) - 1):
        assert reason(data[:cut], secret) == "truncated", cut
    assert reason(data + b"\0", secret) == "truncated"


def test_magic_and_version() -> None:
    data = bytearray(pack())
    assert reason(b"XXXX" + bytes(data[4:])) == "magic"
    data[4] = 2
    assert reason(bytes(data)) == "version"


@pytest.mark.parametrize("secret", [None, SECRET])
def test_every_single_bit_flip_detected(secret: bytes | None) -> None:
    data = pack(b"tiny KV chunk", secret)
    seen = set()
    for bit in range(len(data) * 8):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        seen.add(reason(bytes(flipped), secret))
    expected = {"magic", "version", "digest", "key", "positions", "truncated"}
    assert seen == expected | ({"mac"} if secret else {"crc"})


def test_wrong_scheme_key_and_positions() -> None:
    data = pack()
    assert reason(data, digest="fedcba9876543210") == "digest"
    assert reason(data, key=OTHER_KEY) == "key"
    assert reason(data, start=0) == "positions"
    assert reason(data, num_tokens=31) == "positions"


def test_secret_refuses_forgeries() -> None:
    assert reason(pack(), SECRET) == "unauthenticated"  # no MAC
    assert reason(pack(secret=b"another secret"), SECRET) == "mac"  # wrong secret
    data = bytearray(pack(secret=SECRET))
    data[-1] ^= 0x80
    assert reason(bytes(data), SECRET) == "mac"
    payload_changed = bytearray(pack(secret=SECRET))
    payload_changed[HEADER_BYTES] ^= 0x01
    assert reason(bytes(payload_changed), SECRET) == "mac"


def test_object_moved_to_another_key() -> None:
    data = pack(secret=SECRET)
    assert reason(data, SECRET, key=OTHER_KEY) == "key"
    # an attacker rewrites the key tag in the header to match: the MAC (over header and key) refuses it
    forged = bytearray(data)
    other = pack(key=OTHER_KEY)
    forged[24:40] = other[24:40]
    assert reason(bytes(forged), SECRET, key=OTHER_KEY) == "mac"
    assert unpack_object(bytes(forged), **{**WHERE, "key": OTHER_KEY}, secret=None) == b"payload bytes"  # no secret


@pytest.mark.parametrize(
    ("over", "match"),
    [
        (dict(key=""), "key"),
        (dict(digest=""), "digest"),
        (dict(start=-1), "start"),
        (dict(num_tokens=0), "num_tokens"),
        (dict(secret=b""), "secret"),
        (dict(secret="text"), "secret"),
    ],
)
def test_bad_arguments(over: dict, match: str) -> None:
    args = {**WHERE, "secret": None, **over}
    with pytest.raises(ValueError, match=match) as e:
        pack_object(b"x", **args)
    assert not isinstance(e.value, FrameError)
    with pytest.raises(ValueError, match=match):
        unpack_object(pack(), **args)
    with pytest.raises(ValueError, match="payload"):
        pack_object("text", **WHERE, secret=None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="payload_nbytes"):
        object_nbytes(-1)
