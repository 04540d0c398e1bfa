"""The L3 object format (bytes on the wire): a fixed header, the opaque payload, an optional HMAC-SHA256.

Layout (little-endian): ``magic "KVL3" | version u8 | flags u8 | reserved u16 | digest tag 16 B | key tag 16 B |
start u64 | num_tokens u32 | payload length u64 | CRC32 of payload u32`` (64 bytes), the payload, then a 32-byte
MAC when flag bit 0 is set. The tags are the first 16 bytes of SHA-256 of the scheme digest and of the object
key. The MAC is HMAC-SHA256(secret) over the header, the full key (UTF-8) and the payload.

Threat model. The shared store is writable by every replica and by anyone who reaches it; whoever can write
it can inject KV into other users' prompts (a request that hashes to a key reads whatever sits there, and the
CRC only catches accidents). With a ``secret`` shared by all replicas, objects without a MAC or with a wrong
one are refused: an attacker without the secret cannot forge an object. The MAC does not hide content (the
payload is not encrypted: anyone who can read the store can decode KV of prompts whose tokens they guess).
Replaying a valid object under its own key is harmless: the key binds the token chain, the positions and the
scheme digest, so the object is exactly the KV that key names. The MAC covers the key, so moving a valid
object to another key fails. Without a secret, objects carrying a MAC are accepted (the MAC is ignored): a
reader without the secret cannot check it, and a fleet migrating to a secret keeps working.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib

MAGIC = b"KVL3"
VERSION = 1
FLAG_MAC = 0x01
_HEADER = struct.Struct("<4sBBH16s16sQIQI")
HEADER_BYTES = _HEADER.size  # 64
MAC_BYTES = hashlib.sha256().digest_size  # 32
REASONS = ("truncated", "magic", "version", "digest", "key", "positions", "crc", "mac", "unauthenticated")


class FrameError(ValueError):
    """An L3 object that must not be used; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"reason: expected one of {REASONS}, got {reason!r}")
        super().__init__(f"L3 object refused ({reason}): {message}")
        self.reason = reason


def _tag(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()[:16]


def _check_args(key: str, digest: str, start: int, num_tokens: int, secret: bytes | None) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"key: expected a non-empty str, got {key!r}")
    if not isinstance(digest, str) or not digest:
        raise ValueError(f"digest: expected a non-empty str, got {digest!r}")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < 2**64:
        raise ValueError(f"start: expected an int in [0, 2**64), got {start!r}")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens < 2**32:
        raise ValueError(f"num_tokens: expected an int in [1, 2**32), got {num_tokens!r}")
    if secret is not None and (not isinstance(secret, bytes) or not secret):
        raise ValueError(f"secret: expected None or non-empty bytes, got {type(secret).__name__} of {secret!r:.20}")


def _mac(secret: bytes, header: bytes, key: str, payload: bytes | memoryview) -> bytes:
    m = hmac.new(secret, header, hashlib.sha256)
    m.update(key.encode("utf-8"))
    m.update(payload)
    return m.digest()


def object_nbytes(payload_nbytes: int) -> int:
    """Upper bound of the packed size of a payload of ``payload_nbytes`` bytes (header + payload + MAC)."""
    if isinstance(payload_nbytes, bool) or not isinstance(payload_nbytes, int) or payload_nbytes < 0:
        raise ValueError(f"payload_nbytes: expected an int >= 0, got {payload_nbytes!r}")
    return HEADER_BYTES + payload_nbytes + MAC_BYTES


def pack_object(payload: bytes, *, key: str, digest: str, start: int, num_tokens: int, secret: bytes | None) -> bytes:
    """One L3 object: header, ``payload`` and, with a ``secret``, the MAC. ``start``/``num_tokens``: the token
    positions the payload holds."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ValueError(f"payload: expected bytes, got {type(payload).__name__}")
    _check_args(key, digest, start, num_tokens, secret)
    body = bytes(payload)
    flags = FLAG_MAC if secret is not None else 0
    header = _HEADER.pack(MAGIC, VERSION, flags, 0, _tag(digest), _tag(key), start, num_tokens, len(body),
                          zlib.crc32(body))  # fmt: skip
    parts = [header, body]
    if secret is not None:
        parts.append(_mac(secret, header, key, body))
    return b"".join(parts)


def unpack_object(data: bytes, *, key: str, digest: str, start: int, num_tokens: int, secret: bytes | None) -> bytes:
    """The payload of ``data`` if it is an intact object of ``key`` (scheme ``digest``, positions ``start`` ..
    ``start + num_tokens``) and, with a ``secret``, authentic; raises ``FrameError`` otherwise."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"data: expected bytes, got {type(data).__name__}")
    _check_args(key, digest, start, num_tokens, secret)
    view = memoryview(data).cast("B")
    if len(view) < HEADER_BYTES:
        raise FrameError("truncated", f"{len(view)} bytes, expected at least the {HEADER_BYTES}-byte header")
    header = bytes(view[:HEADER_BYTES])
    magic, version, flags, reserved, digest_tag, key_tag, o_start, o_tokens, plen, crc = _HEADER.unpack(header)
    if magic != MAGIC:
        raise FrameError("magic", f"expected {MAGIC!r}, got {magic!r}")
    if version != VERSION or flags & ~FLAG_MAC or reserved:
        raise FrameError("version", f"expected version {VERSION}, flags <= {FLAG_MAC}, reserved 0; "
                                    f"got {version}, {flags}, {reserved}")  # fmt: skip
    has_mac = bool(flags & FLAG_MAC)
    expected = HEADER_BYTES + plen + (MAC_BYTES if has_mac else 0)
    if len(view) != expected:
        raise FrameError("truncated", f"{len(view)} bytes, expected {expected} (payload {plen}, MAC {has_mac})")
    if secret is not None and not has_mac:
        raise FrameError("unauthenticated", "a secret is configured and the object carries no MAC")
    if digest_tag != _tag(digest):
        raise FrameError("digest", f"object of another scheme (tag {digest_tag.hex()}), expected digest {digest}")
    if key_tag != _tag(key):
        raise FrameError("key", f"object of another key (tag {key_tag.hex()}), expected {key}")
    if (o_start, o_tokens) != (start, num_tokens):
        raise FrameError("positions", f"expected start {start}, {num_tokens} tokens; got {o_start}, {o_tokens}")
    payload = view[HEADER_BYTES : HEADER_BYTES + plen]
    if secret is not None and not hmac.compare_digest(bytes(view[HEADER_BYTES + plen:]),
                                                      _mac(secret, header, key, payload)):  # fmt: skip
        raise FrameError("mac", "MAC does not match (wrong secret, or the object was altered or moved)")
    actual_crc = zlib.crc32(payload)
    if actual_crc != crc:
        raise FrameError("crc", f"payload CRC32 {actual_crc:#010x}, header says {crc:#010x}")
    return bytes(payload)
