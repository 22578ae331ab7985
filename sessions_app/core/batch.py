"""Apply a batch of fragments from one input partition to session buffers: pure.

The Faust agent groups what it consumed by partition and hands each group
here with a way to read stored buffers; it gets back everything to send and
everything to write. Nothing here touches Kafka or RocksDB, so the whole
reassembly decision (replays, tombstones, bad records) is tested without a
broker.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from sessions_app.core.keys import MAX_SESSION_ID_BYTES
from sessions_app.core.reassembly import cut_records, unfinished_delimiter
from sessions_app.core.session_state import CorruptSessionState, SessionState

Headers = tuple[tuple[str, bytes], ...]


class Fragment(NamedTuple):
    """One input record, with where it came from (a tuple: built once per fragment)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


#: Fragments per input partition, each list in offset order.
ByPartition = dict[int, list[Fragment]]


def fragments_in(fetched: ByPartition) -> int:
    """Return how many fragments a fetch or batch holds."""
    return sum(len(fragments) for fragments in fetched.values())


class OutRecord(NamedTuple):
    """A record to produce: complete records and expired remnants (a tuple: cheap to build)."""

    key: bytes
    value: bytes
    headers: Headers


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A fragment that could not be applied, and why."""

    fragment: Fragment
    stage: str
    error_class: str
    message: str

    def headers(self) -> Headers:
        """Return the dead-letter headers naming the error and the source record."""
        return (
            ("error.stage", self.stage.encode()),
            ("error.class", self.error_class.encode()),
            ("error.message", self.message.encode("utf-8", "backslashreplace")),
            ("source.topic", self.fragment.topic.encode()),
            ("source.partition", str(self.fragment.partition).encode()),
            ("source.offset", str(self.fragment.offset).encode()),
        )


@dataclass(slots=True)
class BatchResult:
    """What applying a batch produced.

    `writes` maps a session to its new state, or None to delete it; `before`
    holds the stored state of every session in `writes` as the batch found
    it; `chunks` the chunk keys of pending bytes to write or delete.
    """

    records: list[OutRecord] = field(default_factory=list)
    expired: list[OutRecord] = field(default_factory=list)
    dead_letters: list[DeadLetter] = field(default_factory=list)
    writes: dict[bytes, SessionState | None] = field(default_factory=dict)
    before: dict[bytes, SessionState | None] = field(default_factory=dict)
    #: Chunk keys to write, (session ID, index) -> bytes, or None to delete; the last op wins.
    chunks: dict[tuple[bytes, int], bytes | None] = field(default_factory=dict)
    fragments_replayed: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    overflows: int = 0
    applied_through: int = -1

    @property
    def live_delta(self) -> int:
        """Return how much the batch changes the number of live sessions."""
        return sum(
            (after is not None) - (self.before[key] is not None)
            for key, after in self.writes.items()
        )


@dataclass(slots=True)
class ActivityClock:
    """Stamps batches with the worker's wall clock in microseconds, one per fragment.

    A session's last activity decides when it expires and which session an
    eviction takes first. Each fragment of a batch gets its own microsecond,
    so sessions touched in one batch keep their arrival order; the next batch
    starts after the last stamp if the wall clock has not passed it yet, so
    stamps never go backwards. The lead over the wall clock is at most one
    batch (20 ms for 20,000 fragments) as long as fragments arrive at fewer
    than one per microsecond, which no worker comes near: deadlines do not
    drift with uptime, and a restarted worker's stamps follow the old ones.
    """

    next_us: int = 0

    def stamp(self, now_us: int, fragments: int) -> int:
        """Return the stamp of a batch's first fragment; the batch takes `fragments` of them."""
        first = max(now_us, self.next_us)
        self.next_us = first + fragments
        return first


class InvalidSessionKey(ValueError):
    """A fragment whose key cannot name a session."""


_EMPTY = SessionState()
#: Builds a NamedTuple from its fields, all given, without its Python-level __new__: the
#: common path builds a state and an output record per fragment.
_new = tuple.__new__


class CapacityReached(RuntimeError):
    """The worker holds as many sessions as SESSIONS_MAX_SESSIONS allows."""


#: Pending bytes a session keeps inline in its buffer; past this they go into chunk keys.
INLINE_LIMIT = 1024

#: Reads the chunks of these indices of a session from the store.
ChunkLoader = Callable[[bytes, list[int]], list[bytes]]


def _no_chunks(session_id: bytes, indices: list[int]) -> list[bytes]:
    raise CorruptSessionState(f"the buffer names {len(indices)} chunks, but no store holds any")


def pending_of(
    session_id: bytes,
    state: SessionState,
    chunks: dict[tuple[bytes, int], bytes | None],
    load_chunks: ChunkLoader,
) -> bytes:
    """Return all of a session's pending bytes: its chunks, read back once, then the inline."""
    if not state.chunks:
        return state.pending
    written = [chunks.get((session_id, index)) for index in range(state.chunks)]
    # Those this batch has not written are in the store.
    missing = [index for index, piece in enumerate(written) if piece is None]
    stored = dict(zip(missing, load_chunks(session_id, missing), strict=True)) if missing else {}
    pieces = [stored[index] if piece is None else piece for index, piece in enumerate(written)]
    return b"".join(pieces) + state.pending


def drop_chunks(
    session_id: bytes, state: SessionState, chunks: dict[tuple[bytes, int], bytes | None]
) -> None:
    """Delete a session's chunk keys (a later write in the same batch may put one back)."""
    for index in range(state.chunks):
        chunks[(session_id, index)] = None


def apply_fragments(
    fragments: Iterable[Fragment],
    load: Callable[[bytes], bytes | None],
    delimiter: bytes,
    now_us: int,
    max_buffer_bytes: int | None = None,
    may_open: int | None = None,
    applied_through: int = -1,
    load_chunks: ChunkLoader = _no_chunks,
    inline_limit: int = INLINE_LIMIT,
) -> BatchResult:
    """Apply fragments in order, all at once; see PartitionBatch for what applying does."""
    batch = PartitionBatch(
        load,
        delimiter,
        max_buffer_bytes=max_buffer_bytes,
        may_open=may_open,
        applied_through=applied_through,
        load_chunks=load_chunks,
        inline_limit=inline_limit,
    )
    batch.apply(fragments, now_us)
    return batch.result


class PartitionBatch:
    """One partition's batch of fragments, applied in order a slice at a time.

    `load` returns a session's stored buffer or None. What a slice leaves (the
    sessions it read and changed, the live sessions it opened) the next slice
    sees, so applying a batch in slices gives the same result as applying it
    whole; the pipeline lets the event loop in between slices.

    The fragment at position i of a slice applied at `now_us` is stamped as active
    at `now_us + i` (see ActivityClock).

    Pending bytes past `inline_limit` move into chunk keys, one per fragment from
    then on, so a fragment is written once whatever the session holds, and the
    chunks (`load_chunks` reads them) are read back once, when their record
    completes, overflows or the session ends. The delimiter is looked for in the
    new fragment and the few bytes before it that may begin one, never in the
    chunks: they never end inside a possible delimiter.

    A session whose pending bytes would exceed `max_buffer_bytes` has them
    flushed as expired remnants (reason `overflow`) of at most that many bytes
    and goes on empty; so does the head of a complete record longer than that,
    so nothing sent or stored outgrows the cap. Session IDs longer than
    MAX_SESSION_ID_BYTES are dead-lettered (stage `validate`). With
    `may_open` set, fragments that would open more new sessions than that are
    dead-lettered (stage `capacity`) instead. Fragments at or below
    `applied_through`, the partition's watermark, were applied before and
    are skipped; `result.applied_through` is the new watermark.
    """

    def __init__(
        self,
        load: Callable[[bytes], bytes | None],
        delimiter: bytes,
        *,
        max_buffer_bytes: int | None = None,
        may_open: int | None = None,
        applied_through: int = -1,
        load_chunks: ChunkLoader = _no_chunks,
        inline_limit: int = INLINE_LIMIT,
    ) -> None:
        self.result = BatchResult(applied_through=applied_through)
        self._load = load
        self._delimiter = delimiter
        self._cap = max_buffer_bytes
        self._may_open = may_open
        self._watermark = applied_through
        self._load_chunks = load_chunks
        self._inline_limit = inline_limit
        #: Each session's state as the fragments applied so far left it (None: no session).
        self._states: dict[bytes, SessionState | None] = {}
        #: How many more live sessions than before the fragments applied so far leave.
        self._live_delta = 0

    def apply(self, fragments: Iterable[Fragment], now_us: int) -> None:
        """Apply the next fragments of the batch, in order, stamped from `now_us` on."""
        result = self.result
        states = self._states
        before = result.before
        writes = result.writes
        out = result.records
        load, load_chunks, decode, new = self._load, self._load_chunks, SessionState.decode, _new
        delimiter, max_buffer_bytes, inline_limit = self._delimiter, self._cap, self._inline_limit
        may_open, applied_through = self._may_open, self._watermark
        live_delta = self._live_delta
        applied = result.applied_through
        for position, fragment in enumerate(fragments):
            _, _, offset, key, value = fragment
            if offset <= applied_through:
                # Redelivered after a crash or rebalance: applied already, whatever became
                # of its session since.
                result.fragments_replayed += 1
                continue
            if offset > applied:
                applied = offset
            if not key or len(key) > MAX_SESSION_ID_BYTES:
                what = (
                    f"a {'null' if key is None else 'empty'} key; the key must be the session ID"
                    if not key
                    else f"a key of {len(key):,} bytes; session IDs may be at most "
                    f"{MAX_SESSION_ID_BYTES:,} bytes"
                )
                result.dead_letters.append(
                    DeadLetter(
                        fragment, "validate", InvalidSessionKey.__name__, f"fragment has {what}"
                    )
                )
                continue
            if key in states:
                state = states[key]
            else:
                try:
                    raw = load(key)
                    state = None if raw is None else decode(raw)
                except Exception as exc:
                    result.dead_letters.append(
                        DeadLetter(
                            fragment,
                            "state",
                            type(exc).__name__,
                            f"stored buffer unreadable: {exc}",
                        )
                    )
                    continue
                states[key] = before[key] = state
            if state is not None and offset <= state.applied_offset:
                # Redelivered after a crash or rebalance: already in the buffer.
                result.fragments_replayed += 1
                continue
            try:
                if value is None:
                    if state is not None:
                        pending = pending_of(key, state, result.chunks, load_chunks)
                        result.sessions_closed += 1
                        if pending:
                            result.expired.append(remnant(key, pending, state.next_seq, "closed"))
                        drop_chunks(key, state, result.chunks)
                        states[key] = None
                        writes[key] = None
                        live_delta -= 1
                    continue
                if state is None:
                    if may_open is not None and live_delta >= may_open:
                        raise CapacityReached(
                            "the worker holds SESSIONS_MAX_SESSIONS live sessions; "
                            "SESSIONS_CAP_POLICY=reject refuses new ones"
                        )
                    state = _EMPTY
                    result.sessions_opened += 1
                    live_delta += 1
                records, pending = cut_records(state.pending, value, delimiter)
                seq = state.next_seq
                if (
                    state.chunks
                    or len(pending) > inline_limit
                    or (
                        max_buffer_bytes is not None
                        # Records and tail are cut from these bytes: under the cap, so are they.
                        and len(state.pending) + len(value) > max_buffer_bytes
                        and (
                            len(pending) > max_buffer_bytes or _longest(records) > max_buffer_bytes
                        )
                    )
                ):
                    new_state = _apply_large(
                        key, state, records, pending, delimiter, max_buffer_bytes, inline_limit,
                        result, load_chunks,
                    )._replace(applied_offset=offset, last_seen_us=now_us + position)  # fmt: skip
                else:
                    # The common case: a small session, records under the cap.
                    for record in records:
                        out.append(new(OutRecord, (key, record, (("seq", b"%d" % seq),))))
                        seq += 1
                    # One microsecond per position keeps the sessions of a batch in arrival order.
                    # SessionState(offset, seq, now_us + position, pending):
                    new_state = new(SessionState, (offset, seq, now_us + position, pending, 0, 0))
            except CapacityReached as exc:
                result.dead_letters.append(
                    DeadLetter(fragment, "capacity", type(exc).__name__, str(exc))
                )
                continue
            except Exception as exc:
                result.dead_letters.append(
                    DeadLetter(fragment, "reassemble", type(exc).__name__, str(exc))
                )
                continue
            states[key] = writes[key] = new_state
        result.applied_through = applied
        self._live_delta = live_delta


def _longest(records: list[bytes]) -> int:
    return max(map(len, records)) if records else 0


def _apply_large(
    key: bytes,
    state: SessionState,
    records: list[bytes],
    pending: bytes,
    delimiter: bytes,
    cap: int | None,
    inline_limit: int,
    result: BatchResult,
    load_chunks: ChunkLoader,
) -> SessionState:
    """Take a fragment's records and pending bytes where chunks or the cap come into it.

    Everything is staged and taken into `result` only once it all worked; the state
    returned has the new seq, pending bytes and chunks (the caller sets offset and stamp).
    """
    emitted: list[OutRecord] = []
    flushed: list[OutRecord] = []
    chunk_ops: dict[tuple[bytes, int], bytes | None] = {}
    chunks, spilled = state.chunks, state.spilled
    if chunks and records:
        # The first record began in the chunks: read them back, once, and drop them.
        head = pending_of(key, state._replace(pending=b""), result.chunks, load_chunks)
        records[0] = head + records[0]
        drop_chunks(key, state, chunk_ops)
        chunks = spilled = 0
    seq = state.next_seq
    for record in records:
        if cap is not None and len(record) > cap:
            # A record longer than the cap (one large fragment): its heads go out as
            # overflow remnants, so no record sent is longer than the cap either.
            tail = (len(record) - 1) // cap * cap
            flushed += _overflow(key, seq, record[:tail], cap)
            record = record[tail:]
        emitted.append(OutRecord(key, record, (("seq", b"%d" % seq),)))
        seq += 1
    # Bytes that may begin a delimiter stay inline: the next fragment may complete it.
    keep = unfinished_delimiter(pending, delimiter)
    if cap is not None and spilled + len(pending) > cap:
        whole = pending_of(
            key, state._replace(pending=pending, chunks=chunks), result.chunks, load_chunks
        )
        cut = len(whole) - keep
        if cut:
            flushed += _overflow(key, seq, whole[:cut], cap)
            pending = whole[cut:]
            drop_chunks(key, state._replace(chunks=chunks), chunk_ops)
            chunks = spilled = 0
    if (chunks or len(pending) > inline_limit) and len(pending) > keep:
        # Into a chunk of its own: written once, read back once.
        chunk_ops[(key, chunks)] = pending[: len(pending) - keep]
        spilled += len(pending) - keep
        chunks += 1
        pending = pending[len(pending) - keep :]
    result.records += emitted
    result.expired += flushed
    if flushed:
        result.overflows += 1
    result.chunks.update(chunk_ops)
    return SessionState(state.applied_offset, seq, state.last_seen_us, pending, chunks, spilled)


def _overflow(key: bytes, seq: int, head: bytes, cap: int) -> list[OutRecord]:
    """Return the head of record `seq` as overflow remnants of at most `cap` bytes each."""
    return [
        remnant(key, head[start : start + cap], seq, "overflow")
        for start in range(0, len(head), cap)
    ]


def remnant(key: bytes, pending: bytes, next_seq: int, reason: str) -> OutRecord:
    """Return the expired-topic record for a session's pending bytes."""
    return OutRecord(key, pending, (("reason", reason.encode()), ("seq", str(next_seq).encode())))
