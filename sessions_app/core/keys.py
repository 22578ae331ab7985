"""Key layout of a session_buffers partition in RocksDB: pure byte encoding.

One RocksDB instance per table partition holds six kinds of keys, told
apart by their first byte:

    b"s" + session_id                    -> SessionState bytes        changelogged
    b"k" + session_id + index (4, BE)    -> a chunk of pending bytes  changelogged
    b"x" + session_id                    -> FlushMarker bytes         changelogged
    b"w"                                 -> input offset (8, BE)      changelogged
    b"i" + last_seen_us (8, BE) + sid    -> b""                       local only
    b"c"                                 -> live session count (8, BE) local only

`s` keys are the session buffers. `k` keys hold the first pending bytes of a
session whose pending bytes outgrew its buffer, one chunk per fragment; the
buffer says how many (sessions_app/core/session_state.py). The index has a
fixed width, so no two sessions' chunk keys can be equal. `x` keys are idle flushes in progress:
written (with the buffer's tombstone) before the remnant is sent, deleted
after, so a crash in between can be resolved without losing or repeating
the flush. `i` keys are the idle index, ordered by last activity, so the
oldest sessions are the first keys after b"i". `c` is the number of `s` keys.
`w` is the partition's watermark: every input fragment at or below it has
been applied, so a replayed one is skipped even when its session has since
been closed, expired or evicted and has no buffer to compare with.
Only `s`, `k`, `x` and `w` keys go to the changelog (CHANGELOGGED); `i` and `c`
are derived from them (LOCAL_ONLY), in the same write batch, both when the
pipeline writes and when changelog records are applied during recovery.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

#: The longest session ID a fragment may have: the key is part of every record the worker
#: writes, and Kafka limits a record's size (see sessions_app/core/limits.py).
MAX_SESSION_ID_BYTES = 1024

BUFFER = b"s"
CHUNK = b"k"
MARKER = b"x"
IDLE = b"i"
COUNT_KEY = b"c"
WATERMARK_KEY = b"w"
IDLE_END = b"j"  # first key after every idle-index key
BUFFER_END = b"t"  # first key after every buffer key

#: First bytes of the keys that go to the changelog, and of those derived from them locally.
CHANGELOGGED = frozenset({BUFFER, CHUNK, MARKER, WATERMARK_KEY})
LOCAL_ONLY = frozenset({IDLE, COUNT_KEY})

_MS = struct.Struct(">q")
_pack_stamp = _MS.pack
_COUNT = struct.Struct(">q")
_MARKER = struct.Struct(">BqQ")
_CHUNK_INDEX = struct.Struct(">I")


def buffer_key(session_id: bytes) -> bytes:
    """Return the table key of a session's buffer."""
    return BUFFER + session_id


def chunk_key(session_id: bytes, index: int) -> bytes:
    """Return the table key of a session's chunk of pending bytes number `index`."""
    return CHUNK + session_id + _CHUNK_INDEX.pack(index)


def marker_key(session_id: bytes) -> bytes:
    """Return the table key of a session's idle-flush marker."""
    return MARKER + session_id


def idle_key(last_seen_us: int, session_id: bytes) -> bytes:
    """Return the idle-index key: sorts by last activity, then session."""
    # Built once per session a batch touches: no max() call, the method bound once.
    return IDLE + _pack_stamp(last_seen_us if last_seen_us > 0 else 0) + session_id


def idle_bound(last_seen_us: int) -> bytes:
    """Return the smallest idle-index key with activity at or after `last_seen_us`."""
    return IDLE + _MS.pack(max(last_seen_us, 0))


def parse_idle_key(key: bytes) -> tuple[int, bytes]:
    """Return (last_seen_us, session_id) of an idle-index key."""
    return _MS.unpack_from(key, 1)[0], key[9:]


def encode_offset(offset: int) -> bytes:
    """Return the stored form of an input offset."""
    return _MS.pack(offset)


def decode_offset(raw: bytes | None) -> int:
    """Read a stored input offset; none stored means -1 (nothing applied)."""
    return -1 if raw is None else int(_MS.unpack(raw)[0])


def encode_count(count: int) -> bytes:
    """Return the stored form of a live-session count."""
    return _COUNT.pack(count)


def decode_count(raw: bytes | None) -> int:
    """Read a stored live-session count; none stored means zero."""
    return 0 if raw is None else int(_COUNT.unpack(raw)[0])


@dataclass(frozen=True, slots=True)
class FlushMarker:
    """An idle flush in progress: the remnant, its seq, and where to look for it.

    `scan_from` is an offset of the expired topic's partition at or before
    the one the remnant gets, so a restart can tell whether it was sent.
    """

    scan_from: int
    seq: int
    pending: bytes

    def encode(self) -> bytes:
        """Return the stored form: version, scan_from, seq, then the remnant."""
        return _MARKER.pack(1, self.scan_from, self.seq) + self.pending

    @classmethod
    def decode(cls, raw: bytes) -> FlushMarker:
        """Read the stored form."""
        version, scan_from, seq = _MARKER.unpack_from(raw)
        if version != 1:
            raise ValueError(f"flush marker has version {version}, expected 1")
        return cls(scan_from, seq, raw[_MARKER.size :])
