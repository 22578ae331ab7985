"""The stored form of one session's buffer: pure byte encoding, no I/O.

Layout of a value in the `session_buffers` table (big-endian)::

    version         1 byte    1: all pending bytes inline; 2: the first ones in chunks
    applied_offset  8 bytes   signed: input offset of the last fragment applied, -1 for none
    next_seq        8 bytes   unsigned: `seq` the session's next complete record gets
    last_seen_us    8 bytes   signed: worker wall clock (µs) when the last fragment arrived
    chunks          4 bytes   version 2 only: chunk keys 0..chunks-1 hold the first bytes
    spilled         8 bytes   version 2 only: how many bytes those chunks hold
    pending         the rest  the pending bytes after the chunks (all of them in version 1)

Pending bytes are those received after the last delimiter. A session whose
pending bytes pass a threshold keeps them in chunk keys beside its buffer
(sessions_app/core/keys.py), one per fragment, so a fragment costs a write
of its own bytes, not of everything the session holds (sessions_app/core/
batch.py); the buffer then keeps only the last few bytes inline, those that
may begin a delimiter. Small sessions, the common case, stay in version 1.

It is stored under `keys.buffer_key(session_id)`: the session ID (the input
record's key) behind a one-byte prefix.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

VERSION = 1
CHUNKED = 2
_HEADER = struct.Struct(">BqQq")
_INLINE_FIELDS = struct.Struct(">qQq")  # a version-1 header after its version byte
_CHUNKED = struct.Struct(">BqQqIQ")
HEADER_SIZE = _HEADER.size
CHUNKED_HEADER_SIZE = _CHUNKED.size


def activity_and_size(raw: bytes) -> tuple[int, int]:
    """Return (last_seen_us, pending bytes) of a stored buffer without decoding its bytes."""
    if raw[:1] == b"\x02":
        fields = _CHUNKED.unpack_from(raw)
        return int(fields[3]), int(fields[5]) + len(raw) - CHUNKED_HEADER_SIZE
    return int(_HEADER.unpack_from(raw)[3]), len(raw) - HEADER_SIZE


class CorruptSessionState(ValueError):
    """A stored session buffer that this version cannot read."""


class SessionState(NamedTuple):
    """What a worker keeps for one live session (a tuple: built and read once per fragment)."""

    applied_offset: int = -1
    next_seq: int = 0
    last_seen_us: int = 0
    #: The pending bytes after the chunks: all of them while `chunks` is 0.
    pending: bytes = b""
    chunks: int = 0
    spilled: int = 0

    @property
    def pending_size(self) -> int:
        """Return how many bytes the session holds, chunks included."""
        return self.spilled + len(self.pending)

    def encode(self) -> bytes:
        """Return the stored form."""
        applied_offset, next_seq, last_seen_us, pending, chunks, spilled = self
        if not chunks:
            return _HEADER.pack(VERSION, applied_offset, next_seq, last_seen_us) + pending
        header = _CHUNKED.pack(CHUNKED, applied_offset, next_seq, last_seen_us, chunks, spilled)
        return header + pending

    @classmethod
    def decode(cls, raw: bytes) -> SessionState:
        """Read the stored form; raise CorruptSessionState if it is not one."""
        if len(raw) >= HEADER_SIZE and raw[0] == VERSION:
            # The common case, read once per fragment: no NamedTuple __new__ in Python.
            applied_offset, next_seq, last_seen_us = _INLINE_FIELDS.unpack_from(raw, 1)
            return tuple.__new__(
                cls, (applied_offset, next_seq, last_seen_us, raw[HEADER_SIZE:], 0, 0)
            )
        if len(raw) < HEADER_SIZE:
            raise CorruptSessionState(
                f"stored buffer is {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header"
            )
        version = raw[0]  # not VERSION: that was read above
        if version == CHUNKED and len(raw) >= CHUNKED_HEADER_SIZE:
            _, applied_offset, next_seq, last_seen_us, chunks, spilled = _CHUNKED.unpack_from(raw)
            pending = raw[CHUNKED_HEADER_SIZE:]
            return cls(applied_offset, next_seq, last_seen_us, pending, chunks, spilled)
        raise CorruptSessionState(
            f"stored buffer has version {version}, expected {VERSION} or {CHUNKED}"
        )
