"""RocksDB for the session buffers: one memory budget per worker, index and counts in step.

Faust gives every table partition its own RocksDB instance with its own block
cache and memtables, so memory grows with the partition count. Here every
instance of the worker shares one block cache and one write-buffer manager
that charges memtables to that cache: `SESSIONS_ROCKSDB_MEMORY` bounds both,
whatever the number of partitions. Index and filter blocks live in the same
cache, so table readers are bounded too.

The store also keeps the idle index and the live-session count (see
sessions_app/keys.py) in the same write batch as the buffers, both for the
agent's writes and for changelog records applied during recovery.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import rocksdict
from faust.stores.rocksdb import RocksDBOptions
from faust.stores.rocksdb import Store as FaustRocksDBStore
from faust.types import TP, EventT

from sessions_app import keys
from sessions_app.session_state import CorruptSessionState, SessionState

BUDGET_OPTION = "sessions_memory_budget"
# A quarter of the budget for memtables, charged to the block cache.
WRITE_BUFFER_SHARE = 4


@dataclass(frozen=True)
class MemoryBudget:
    """The block cache and write-buffer manager every RocksDB instance of the worker shares."""

    total: int
    cache: Any
    write_buffers: Any

    @classmethod
    def create(cls, total: int) -> MemoryBudget:
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


_budget: MemoryBudget | None = None


def memory_budget(total: int) -> MemoryBudget:
    """Return the worker's one memory budget, creating it on first use."""
    global _budget
    if _budget is None:
        _budget = MemoryBudget.create(total)
    return _budget


def current_budget() -> MemoryBudget | None:
    """Return the worker's memory budget, if a store has created it."""
    return _budget


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
        table.set_bloom_filter(self.bloom_filter_size, True)
        table.set_index_type(rocksdict.BlockBasedIndexType.binary_search())
        opts.set_block_based_table_factory(table)
        return opts


def last_seen_of(raw: bytes | None) -> int | None:
    """Return a stored buffer's last activity, or None if there is no readable buffer."""
    if raw is None:
        return None
    try:
        return SessionState.decode(raw).last_seen_us
    except CorruptSessionState:
        return None


@dataclass(frozen=True)
class PreparedWrite:
    """A partition's RocksDB write batch, all but the count and the changelog offset."""

    batch: Any
    delta: int


def prepare_write(
    writes: Mapping[bytes, SessionState | None],
    before: Mapping[bytes, SessionState | None],
    encoded: Mapping[bytes, bytes | None],
    markers: Mapping[bytes, bytes | None] | None = None,
    watermark: int | None = None,
) -> PreparedWrite:
    """Build the write batch for buffers (None deletes), their index entries and markers.

    `encoded` holds each state of `writes` in its stored form, as sent to the changelog.
    """
    batch = rocksdict.WriteBatch(raw_mode=True)
    delta = 0
    for session_id, state in writes.items():
        old = before.get(session_id)
        if old is not None:
            batch.delete(keys.idle_key(old.last_seen_us, session_id))
            delta -= 1
        if state is None:
            batch.delete(keys.buffer_key(session_id))
        else:
            batch.put(keys.buffer_key(session_id), encoded[session_id])
            batch.put(keys.idle_key(state.last_seen_us, session_id), b"")
            delta += 1
    for session_id, marker in (markers or {}).items():
        if marker is None:
            batch.delete(keys.marker_key(session_id))
        else:
            batch.put(keys.marker_key(session_id), marker)
    if watermark is not None:
        batch.put(keys.WATERMARK_KEY, keys.encode_offset(watermark))
    return PreparedWrite(batch, delta)


class SessionStore(FaustRocksDBStore):
    """Faust's RocksDB store, budgeted, with the idle index and counts maintained."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        given = self.options or {}
        options = {k: v for k, v in given.items() if k != BUDGET_OPTION}
        budget = memory_budget(int(given.get(BUDGET_OPTION, 128 * 1024 * 1024)))
        self.rocksdb_options = BudgetedOptions(budget, **options, use_rocksdict=True)
        self.live: dict[int, int] = {}

    def db(self, partition: int) -> Any:
        """Return the RocksDB instance of a partition, opening it if needed (Faust's own paths)."""
        return self._db_for_partition(partition)

    def open_db(self, partition: int) -> Any | None:
        """Return a partition's RocksDB instance if Faust has it open, else None.

        Never opens one: a partition revoked while a batch was in flight stays
        closed (its changelog is already written), and reopening it while the
        old handle lives would fail on RocksDB's lock.
        """
        return self._dbs.get(partition)

    def live_count(self, partition: int) -> int:
        """Return the number of live sessions stored for an open partition (0 if not open)."""
        count = self.live.get(partition)
        if count is None:
            db = self.open_db(partition)
            if db is None:
                return 0
            count = self.live[partition] = keys.decode_count(db.get(keys.COUNT_KEY))
        return count

    def watermark(self, partition: int) -> int:
        """Return the highest input offset applied in a partition, -1 for none."""
        db = self.open_db(partition)
        return -1 if db is None else keys.decode_offset(db.get(keys.WATERMARK_KEY))

    def revoke_partitions(self, table: Any, tps: set[TP]) -> None:
        super().revoke_partitions(table, tps)
        for tp in tps:
            self.live.pop(tp.partition, None)

    def reset_state(self) -> None:
        super().reset_state()
        self.live.clear()

    def commit_write(self, partition: int, prepared: PreparedWrite, changelog_offset: int) -> None:
        """Write a prepared batch, with the live count and the changelog offset it is at."""
        self._finish(partition, prepared.batch, prepared.delta, changelog_offset)

    def _finish(
        self, partition: int, batch: Any, delta: int, changelog_offset: int, db: Any = None
    ) -> None:
        db = db if db is not None else self.open_db(partition)
        if db is None:
            # Revoked meanwhile: the changelog has the change for whoever recovers it.
            self.log.info("Partition %d revoked before its write; left to the changelog", partition)
            return
        count = self._count_in(partition, db) + delta
        batch.put(keys.COUNT_KEY, keys.encode_count(count))
        # Faust reads this key at recovery and replays the changelog after it.
        batch.put(self.offset_key, str(changelog_offset).encode())
        db.write(batch)
        self.live[partition] = count

    def _count_in(self, partition: int, db: Any) -> int:
        count = self.live.get(partition)
        return keys.decode_count(db.get(keys.COUNT_KEY)) if count is None else count

    def apply_changelog_batch(
        self,
        batch: Iterable[EventT[Any]],
        to_key: Callable[[Any], Any],
        to_value: Callable[[Any], Any],
    ) -> None:
        """Apply changelog records as Faust does, keeping the idle index and count in step."""
        per_partition: dict[int, tuple[Any, dict[bytes, bytes | None], list[int]]] = {}
        for event in batch:
            message = event.message
            partition, value = message.partition, message.value
            key: bytes = message.key or b""
            entry = per_partition.get(partition)
            if entry is None:
                entry = per_partition[partition] = (
                    rocksdict.WriteBatch(raw_mode=True),
                    {},
                    [0, -1],
                )
            write, seen, tally = entry
            tally[1] = max(tally[1], message.offset)
            if key[:1] == keys.BUFFER:
                old: bytes | None = seen[key] if key in seen else self.db(partition).get(key)
                session_id = key[1:]
                old_seen, new_seen = last_seen_of(old), last_seen_of(value)
                if old_seen is not None:
                    write.delete(keys.idle_key(old_seen, session_id))
                if new_seen is not None:
                    write.put(keys.idle_key(new_seen, session_id), b"")
                tally[0] += (value is not None) - (old is not None)
            if value is None:
                write.delete(key)
            else:
                write.put(key, value)
            seen[key] = value
        for partition, (write, _, (delta, offset)) in per_partition.items():
            self._finish(partition, write, delta, offset, self.db(partition))
