"""RocksDB for the session buffers: the one door to it, under one memory budget per worker.

Faust gives every table partition its own RocksDB instance with its own block
cache and memtables, so memory grows with the partition count. Here every
instance of the worker shares one block cache and one write-buffer manager
that charges memtables to that cache: `SESSIONS_ROCKSDB_MEMORY` bounds both,
whatever the number of partitions. Index and filter blocks live in the same
cache, so table readers are bounded too.

`PartitionStore` is everything the rest of the package may ask of one
partition's instance (a session's state, the oldest sessions of the idle
index, the flush markers, the watermark, the live count) and the only code
that builds its keys or writes to it: the idle index and the live count
(sessions_app/core/keys.py) change in the same write batch as the buffers,
both for the pipeline's writes and for changelog records applied during
recovery. `SessionStore` is Faust's store with those partitions; nothing
outside this module reaches into Faust's `_dbs`.

Faust internals used here (`_dbs`, `_db_for_partition`, `offset_key`,
`apply_changelog_batch`) are checked against faust-streaming 0.15.3.
"""

from __future__ import annotations

import itertools
import struct
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import rocksdict
from faust.stores.rocksdb import RocksDBOptions
from faust.stores.rocksdb import Store as FaustRocksDBStore
from faust.types import EventT

from sessions_app.core import keys
from sessions_app.core.batch import pending_of
from sessions_app.core.session_state import (
    CHUNKED,
    VERSION,
    CorruptSessionState,
    SessionState,
    activity_and_size,
)

#: A quarter of the budget for memtables, charged to the block cache.
WRITE_BUFFER_SHARE = 4
#: Bloom filter bits per key: about 1% false positives (Faust's default of 3 gives ~24%).
BLOOM_BITS_PER_KEY = 10


@dataclass(frozen=True)
class MemoryBudget:
    """The block cache and write-buffer manager every RocksDB instance of the worker shares."""

    total: int
    cache: Any
    write_buffers: Any

    @classmethod
    def create(cls, total: int) -> MemoryBudget:
        """Return a budget of `total` bytes: a cache, a quarter of it for memtables."""
        cache = rocksdict.Cache(total)
        write_buffers = rocksdict.WriteBufferManager.new_write_buffer_manager_with_cache(
            total // WRITE_BUFFER_SHARE, False, cache
        )
        return cls(total, cache, write_buffers)

    def usage(self) -> dict[str, int]:
        """Return bytes in use: block cache (which includes memtables) and memtables alone."""
        return {
            "budget_bytes": self.total,
            "block_cache_usage_bytes": int(self.cache.get_usage()),
            "block_cache_pinned_bytes": int(self.cache.get_pinned_usage()),
            "memtable_bytes": int(self.write_buffers.get_usage()),
        }


class BudgetedOptions(RocksDBOptions):
    """Faust's RocksDB options with the shared cache and write-buffer manager."""

    def __init__(self, budget: MemoryBudget, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.budget = budget

    def as_options(self) -> Any:
        opts = rocksdict.Options(raw_mode=True)
        opts.create_if_missing(True)
        opts.set_max_open_files(self.max_open_files or -1)
        # Per instance memtables stay small; the manager caps their sum.
        opts.set_write_buffer_size(min(16 * 1024 * 1024, self.budget.total // 8))
        opts.set_max_write_buffer_number(2)
        opts.set_target_file_size_base(self.target_file_size_base)
        opts.set_write_buffer_manager(self.budget.write_buffers)
        table = rocksdict.BlockBasedOptions()
        table.set_block_cache(self.budget.cache)
        table.set_cache_index_and_filter_blocks(True)
        table.set_pin_l0_filter_and_index_blocks_in_cache(True)
        # Most point reads are of sessions not stored yet (every fragment that opens one):
        # at Faust's 3 bits per key a quarter of them reach a data block; at 10, 1 in 100.
        table.set_bloom_filter(BLOOM_BITS_PER_KEY, False)
        # Index and filter cut into 4 KiB partitions behind a small pinned top level: a
        # cache miss reads one partition, not the whole filter and index of a large file.
        table.set_index_type(rocksdict.BlockBasedIndexType.two_level_index_search())
        table.set_partition_filters(True)
        table.set_metadata_block_size(4096)
        table.set_pin_top_level_index_and_filter(True)
        opts.set_block_based_table_factory(table)
        return opts


#: First bytes of the stored buffers this version reads.
_READABLE = frozenset({bytes([VERSION]), bytes([CHUNKED])})


def last_seen_of(raw: bytes | None) -> int | None:
    """Return a stored buffer's last activity, or None if there is no readable buffer."""
    if raw is None or raw[:1] not in _READABLE:
        return None
    try:
        return activity_and_size(raw)[0]
    except struct.error:
        return None


def idle_key_of(raw: bytes | None, session_id: bytes) -> bytes | None:
    """Return the idle-index key of a stored buffer, None if there is no readable buffer."""
    last_seen = last_seen_of(raw)
    return None if last_seen is None else keys.idle_key(last_seen, session_id)


@dataclass(frozen=True)
class PreparedWrite:
    """A partition's RocksDB write batch, all but the count and the changelog offset."""

    batch: Any
    delta: int
    #: The smallest idle-index key the batch puts, if it puts any.
    lowest_idle: bytes | None = None


def prepare_write(
    writes: Mapping[bytes, SessionState | None],
    before: Mapping[bytes, SessionState | None],
    encoded: Mapping[bytes, bytes | None],
    markers: Mapping[bytes, bytes | None] | None = None,
    watermark: int | None = None,
    chunks: Mapping[tuple[bytes, int], bytes | None] | None = None,
) -> PreparedWrite:
    """Build the write batch for buffers (None deletes), their index entries and markers.

    `before` holds each session's stored state as the change found it, `encoded`
    each state of `writes` in its stored form, as sent to the changelog.
    """
    batch = rocksdict.WriteBatch(raw_mode=True)
    # Run once per session a batch touches: the methods and key builders bound once.
    put, delete, found = batch.put, batch.delete, before.get
    idle_key, buffer_key = keys.idle_key, keys.buffer_key
    delta = 0
    lowest: bytes | None = None
    for session_id, state in writes.items():
        old = found(session_id)
        if old is not None:
            delete(idle_key(old.last_seen_us, session_id))
            delta -= 1
        if state is None:
            delete(buffer_key(session_id))
        else:
            put(buffer_key(session_id), encoded[session_id])
            idle = idle_key(state.last_seen_us, session_id)
            put(idle, b"")
            if lowest is None or idle < lowest:
                lowest = idle
            delta += 1
    for (session_id, index), chunk in (chunks or {}).items():
        if chunk is None:
            batch.delete(keys.chunk_key(session_id, index))
        else:
            batch.put(keys.chunk_key(session_id, index), chunk)
    for session_id, marker in (markers or {}).items():
        if marker is None:
            batch.delete(keys.marker_key(session_id))
        else:
            batch.put(keys.marker_key(session_id), marker)
    if watermark is not None:
        batch.put(keys.WATERMARK_KEY, keys.encode_offset(watermark))
    return PreparedWrite(batch, delta, lowest)


class ChangelogRecord(Protocol):
    """What recovery needs of a changelog record (Faust's messages have it)."""

    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def offset(self) -> int: ...


def _scan_options() -> Any:
    """Read options for a walk over every session: it must not evict the hot blocks."""
    options = rocksdict.ReadOptions()
    options.fill_cache(False)  # type: ignore[call-arg]  # the stub lacks its argument
    options.set_iterate_upper_bound(keys.BUFFER_END)
    options.set_readahead_size(2 * 1024 * 1024)
    return options


def _read_once_options(upper_bound: bytes | None = None) -> Any:
    """Read options for keys read once before they go: the hot blocks stay cached."""
    options = rocksdict.ReadOptions()
    options.fill_cache(False)  # type: ignore[call-arg]  # the stub lacks its argument
    if upper_bound is not None:
        options.set_iterate_upper_bound(upper_bound)
    return options


_ONCE = _read_once_options()


class PartitionStore:
    """One table partition's RocksDB instance, read and written through named operations."""

    def __init__(self, db: Any, offset_key: bytes) -> None:
        self.db = db
        self._offset_key = offset_key
        self._count: int | None = None
        #: No idle-index key before this one is stored. Evictions and expiry delete the
        #: oldest keys, and a walk from the index's start would step over every one of
        #: their tombstones until a compaction drops them: walks start here instead.
        #: Every idle-index key is put through `commit` (the pipeline's writes and the
        #: changelog's), which lowers it for an older key.
        self._idle_floor = keys.IDLE
        #: Held by each write: the pipeline's run in a thread of their own (RocksDB lets go
        #: of the GIL while it writes), the changelog's (recovery, standbys) on the event
        #: loop. A count read, changed and written must not meet another write meanwhile.
        self._writing = threading.Lock()

    def loader(self) -> Callable[[bytes], bytes | None]:
        """Return a function giving a session's stored state, undecoded (None if none)."""
        get, prefix = self.db.get, keys.BUFFER

        def load(session_id: bytes) -> bytes | None:
            return get(prefix + session_id)  # type: ignore[no-any-return]

        return load

    def chunk_loader(self, *, going: bool = False) -> Callable[[bytes, list[int]], list[bytes]]:
        """Return a function giving the chunks of these indices of a session's pending bytes.

        `going`: of sessions about to go (evicted, expired), not kept in the block cache.
        """
        get, options = self.db.get, (_ONCE if going else None)

        def load_chunks(session_id: bytes, indices: list[int]) -> list[bytes]:
            chunks = [get(keys.chunk_key(session_id, index), None, options) for index in indices]
            if any(chunk is None for chunk in chunks):
                raise CorruptSessionState(f"chunks {indices} of the session are not all stored")
            return chunks

        return load_chunks

    def pending(self, session_id: bytes, state: SessionState) -> bytes:
        """Return all of a stored session's pending bytes, its chunks read back.

        For sessions about to go (expired): their chunks are not kept in the block cache.
        """
        return pending_of(session_id, state, {}, self.chunk_loader(going=True))

    def session(self, session_id: bytes) -> SessionState | None:
        """Return a session's stored state, or None if it has none."""
        raw = self.db.get(keys.buffer_key(session_id))
        return None if raw is None else SessionState.decode(raw)

    def states(self, session_ids: Sequence[bytes]) -> list[SessionState | None]:
        """Return the stored states of sessions about to go (evicted, expired), None if none.

        Their blocks are not kept in the block cache. (rocksdict's multi-get fills the
        cache whatever the read options it is given; point reads heed them, as fast.)
        """
        get, once, decode = self.db.get, _ONCE, SessionState.decode
        stored = (get(keys.buffer_key(session_id), None, once) for session_id in session_ids)
        return [None if raw is None else decode(raw) for raw in stored]

    def has_session(self, session_id: bytes) -> bool:
        """Tell whether a session has a stored state."""
        return self.db.get(keys.buffer_key(session_id)) is not None

    def idle(
        self, *, before_us: int | None = None, skip: Collection[bytes] = ()
    ) -> Iterator[tuple[int, bytes]]:
        """Yield (last seen, session ID) pairs, longest idle first, read as they are asked for.

        Only sessions last seen before `before_us` if it is given, and none of `skip`.
        Not to be held across a write to the partition.
        """
        end = keys.IDLE_END if before_us is None else keys.idle_bound(before_us)
        # The oldest sessions are read to be evicted or expired: their blocks are not cached.
        walk = iter(self.db.keys(from_key=self._idle_floor, read_opt=_read_once_options(end)))
        first = next(walk, None)
        if first is None:
            return
        # Nothing is stored between the floor and the first key found: the next walk starts
        # there (no write can come in between: this runs up to its first yield at once).
        self._idle_floor = first
        for key in itertools.chain((first,), walk):
            if key >= end:
                return
            last_seen, session_id = keys.parse_idle_key(key)
            if session_id not in skip:
                yield last_seen, session_id

    def oldest(
        self, limit: int, *, before_us: int | None = None, skip: Collection[bytes] = ()
    ) -> list[tuple[int, bytes]]:
        """Return up to `limit` (last seen, session ID) pairs of `idle`, longest idle first."""
        return list(itertools.islice(self.idle(before_us=before_us, skip=skip), max(limit, 0)))

    def sessions(self) -> Iterator[tuple[bytes, int, int]]:
        """Yield (session ID, pending bytes, last seen) of every session, in ID order.

        One iterator over one snapshot, which a caller may hold across turns of the
        event loop: it walks every session in bounded steps, holding nothing of the
        ones it has passed, and leaves the block cache to the hot blocks.
        """
        walk = self.db.iter(_scan_options())
        walk.seek(keys.BUFFER)
        while walk.valid():
            key = walk.key()
            if key[:1] != keys.BUFFER:
                return
            try:
                last_seen, pending = activity_and_size(walk.value())
            except struct.error:
                pass  # unreadable: the batch core dead-letters its fragments
            else:
                yield key[1:], pending, last_seen
            walk.next()

    def markers(self) -> dict[bytes, keys.FlushMarker]:
        """Return the idle flushes in progress: session ID -> marker."""
        found: dict[bytes, keys.FlushMarker] = {}
        for key, value in self.db.items(from_key=keys.MARKER):
            if key[:1] != keys.MARKER:
                break
            found[key[1:]] = keys.FlushMarker.decode(value)
        return found

    def watermark(self) -> int:
        """Return the highest input offset applied in the partition, -1 for none."""
        return keys.decode_offset(self.db.get(keys.WATERMARK_KEY))

    def live_count(self) -> int:
        """Return the number of sessions stored (kept in step with every write)."""
        if self._count is None:
            self._count = keys.decode_count(self.db.get(keys.COUNT_KEY))
        return self._count

    def commit(
        self, prepared: PreparedWrite, changelog_offset: int, first_offset: int | None = None
    ) -> bool:
        """Write a prepared batch with the new live count and the changelog offset it is at.

        May be called from another thread than the event loop's. `first_offset` is that
        of the change's first changelog record: if the instance has the changelog that
        far already, nothing is written and False returned. A partition that stayed on
        this worker through a rebalance is recovered from the changelog, this change's
        records included, and recovery may come first; the change's counts, reckoned
        against the states before it, would count it twice.
        """
        with self._writing:
            if first_offset is not None and self.changelog_offset() >= first_offset:
                return False
            self._commit(prepared, changelog_offset)
            return True

    def changelog_offset(self) -> int:
        """Return the offset of the last changelog record the instance has, -1 for none."""
        stored = self.db.get(self._offset_key)
        return -1 if stored is None else int(stored)

    def _commit(self, prepared: PreparedWrite, changelog_offset: int) -> None:
        count = self.live_count() + prepared.delta
        batch = prepared.batch
        batch.put(keys.COUNT_KEY, keys.encode_count(count))
        # Faust reads this key at recovery and replays the changelog after it.
        batch.put(self._offset_key, str(changelog_offset).encode())
        if prepared.lowest_idle is not None and prepared.lowest_idle < self._idle_floor:
            self._idle_floor = prepared.lowest_idle
        self.db.write(batch)
        self._count = count

    def apply_changelog(self, records: Sequence[ChangelogRecord]) -> None:
        """Apply changelog records, in offset order, in one write batch with their index and count.

        The stored states the records replace are read in one multi-get, and of each
        state only its activity stamp is decoded.
        """
        if not records:
            return
        with self._writing:  # the stored states read must stay those the write replaces
            self._apply_changelog(records)

    def _apply_changelog(self, records: Sequence[ChangelogRecord]) -> None:
        write = rocksdict.WriteBatch(raw_mode=True)
        put, delete = write.put, write.delete
        buffered = list(dict.fromkeys(r.key for r in records if r.key and r.key[:1] == keys.BUFFER))
        current: dict[bytes, bytes | None] = (
            dict(zip(buffered, self.db.get(buffered), strict=True)) if buffered else {}
        )
        delta = 0
        lowest: bytes | None = None
        for record in records:
            key, value = record.key or b"", record.value
            if key in current:
                old, session_id = current[key], key[1:]
                if old is not None:
                    delta -= 1
                    stale = idle_key_of(old, session_id)
                    if stale is not None:
                        delete(stale)
                if value is not None:
                    delta += 1
                    fresh = idle_key_of(value, session_id)
                    if fresh is not None:
                        put(fresh, b"")
                        if lowest is None or fresh < lowest:
                            lowest = fresh
                current[key] = value
            if value is None:
                delete(key)
            else:
                put(key, value)
        offset = records[-1].offset
        self._commit(PreparedWrite(write, delta, lowest), offset)

    def table_readers_bytes(self) -> int:
        """Return the memory RocksDB's table readers hold (index and filter blocks)."""
        return int(self.db.property_int_value("rocksdb.estimate-table-readers-mem") or 0)


class SessionStore(FaustRocksDBStore):
    """Faust's RocksDB store, budgeted, its partitions reached as PartitionStores."""

    def __init__(self, *args: Any, memory_budget: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.budget = MemoryBudget.create(memory_budget)
        self.rocksdb_options = BudgetedOptions(
            self.budget, **(self.options or {}), use_rocksdict=self.use_rocksdict
        )
        self._partitions: dict[int, PartitionStore] = {}

    def partition(self, partition: int) -> PartitionStore | None:
        """Return a partition's store if Faust has its RocksDB instance open, else None.

        Never opens one: a partition revoked while a batch was in flight stays
        closed (its changelog is already written), and reopening it while the
        old handle lives would fail on RocksDB's lock.
        """
        db = self._dbs.get(partition)
        if db is None:
            self._partitions.pop(partition, None)
            return None
        wrapper = self._partitions.get(partition)
        if wrapper is None or wrapper.db is not db:
            wrapper = self._partitions[partition] = PartitionStore(db, self.offset_key)
        return wrapper

    def open_partitions(self) -> set[int]:
        """Return the partitions whose instances are open, standbys included."""
        return set(self._dbs)

    def memory_usage(self) -> dict[str, int]:
        """Return the shared budget's usage and the table readers of every open instance."""
        usage = self.budget.usage()
        usage["table_readers_bytes"] = sum(
            store.table_readers_bytes()
            for store in (self.partition(p) for p in sorted(self.open_partitions()))
            if store is not None
        )
        return usage

    def apply_changelog_records(self, partition: int, records: Sequence[ChangelogRecord]) -> None:
        """Apply a partition's changelog records in one write batch, opening its instance."""
        self._db_for_partition(partition)  # recovery and standbys open what they fill
        store = self.partition(partition)
        assert store is not None
        store.apply_changelog(records)

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT[Any]],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        """Apply changelog records as Faust does, keeping the idle index and count in step."""
        per_partition: dict[int, list[Any]] = {}
        for event in batch:
            message = event.message
            per_partition.setdefault(message.partition, []).append(message)
        for partition, messages in per_partition.items():
            self.apply_changelog_records(partition, messages)
