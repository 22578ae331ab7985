"""The stored form of one session's buffer: pure byte encoding, no I/O.

Layout of a value in the `session_buffers` table (big-endian)::

    version         1 byte    always 1
    applied_offset  8 bytes   signed: input offset of the last fragment applied, -1 for none
    next_seq        8 bytes   unsigned: `seq` the session's next complete record gets
    last_seen_us    8 bytes   signed: worker wall clock (µs) when the last fragment arrived
    pending         the rest  bytes received after the last delimiter

It is stored under `keys.buffer_key(session_id)`: the session ID (the input
record's key) behind a one-byte prefix (see sessions_app/core/keys.py).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

VERSION = 1
_HEADER = struct.Struct(">BqQq")
HEADER_SIZE = _HEADER.size


def activity_and_size(raw: bytes) -> tuple[int, int]:
    """Return (last_seen_us, pending bytes) of a stored buffer without decoding its bytes."""
    return int(_HEADER.unpack_from(raw)[3]), len(raw) - HEADER_SIZE


class CorruptSessionState(ValueError):
    """A stored session buffer that this version cannot read."""


class SessionState(NamedTuple):
    """What a worker keeps for one live session (a tuple: built and read once per fragment)."""

    applied_offset: int = -1
    next_seq: int = 0
    last_seen_us: int = 0
    pending: bytes = b""

    def encode(self) -> bytes:
        """Return the stored form."""
        return (
            _HEADER.pack(VERSION, self.applied_offset, self.next_seq, self.last_seen_us)
            + self.pending
        )

    @classmethod
    def decode(cls, raw: bytes) -> SessionState:
        """Read the stored form; raise CorruptSessionState if it is not one."""
        if len(raw) < HEADER_SIZE:
            raise CorruptSessionState(
                f"stored buffer is {len(raw)} bytes, shorter than the {HEADER_SIZE}-byte header"
            )
        version, applied_offset, next_seq, last_seen_us = _HEADER.unpack_from(raw)
        if version != VERSION:
            raise CorruptSessionState(f"stored buffer has version {version}, expected {VERSION}")
        return cls(applied_offset, next_seq, last_seen_us, raw[HEADER_SIZE:])
