"""Apply, send, persist: the one path every change to the session buffers takes.

The agent's batches, idle expiry and eviction all build a ChangeSet and take
it through `Pipeline.commit`, under one lock, in the order of README's
delivery guarantee: outputs delivered, then the changelog delivered, then
one RocksDB write batch per partition (in a thread), and only then the
input offsets' commit (the agent's ack).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sessions_app.core import keys
from sessions_app.core.batch import (
    ActivityClock,
    BatchResult,
    ByPartition,
    DeadLetter,
    OutRecord,
    PartitionBatch,
    drop_chunks,
    fragments_in,
    pending_of,
    remnant,
)
from sessions_app.core.capacity import Candidate, choose_evictions
from sessions_app.core.progress import PartitionProgress
from sessions_app.core.session_state import SessionState
from sessions_app.core.totals import PipelineTotals
from sessions_app.engine.store import PartitionStore, PreparedWrite, SessionStore, prepare_write
from sessions_app.settings import Settings
from sessions_app.stream.delivery import Delivery, Outgoing, Send
from sessions_app.stream.monitoring import CapacityMonitor
from sessions_app.stream.topics import SessionTopics

logger = logging.getLogger(__name__)

#: Fragments of a partition applied between two turns of the event loop: about 10-30 ms.
SLICE_FRAGMENTS = 2_000
#: Evictions read, and then taken, between two turns of the event loop.
EVICTION_STEP = 2_000
#: Eviction rounds for one batch: another when a rebalance took a round's evictions.
EVICTION_ROUNDS = 3


def _candidates(partition: int, idle: Iterator[tuple[int, bytes]]) -> Iterator[Candidate]:
    """Return a partition's idle index as eviction candidates, in the same order."""
    return ((last_seen, partition, session_id) for last_seen, session_id in idle)


def _written_or_refused(
    opened: PartitionStore, prepared: PreparedWrite, last: int, first: int | None
) -> bool | Exception:
    """Write a partition's batch (in a thread); return what RocksDB refused it with, if it did.

    Only RocksDB's refusal is a store failure: the executor's own errors are raised.
    """
    try:
        return opened.commit(prepared, last, first)
    except Exception as exc:
        return exc


class StoreRefused(RuntimeError):
    """RocksDB refused a write (a full disk, an I/O error): it refuses every one until reopened.

    Nothing is lost: the changelog has the change, and a restarted worker recovers it.
    """


@dataclass(frozen=True)
class StoreFailure:
    """Why and since when the session store refuses writes."""

    cause: str
    since: float


@dataclass
class PartitionChanges:
    """What one unit of work changes in one partition of the session buffers.

    `writes` maps a session to its new state (None deletes it), `before` holds
    the stored state of each as the work found it, `markers` the idle-flush
    markers to write (None deletes), `watermark` the partition's new one.
    """

    writes: dict[bytes, SessionState | None] = field(default_factory=dict)
    before: dict[bytes, SessionState | None] = field(default_factory=dict)
    markers: dict[bytes, bytes | None] = field(default_factory=dict)
    watermark: int | None = None
    #: Chunk keys of pending bytes, (session ID, index) -> bytes, or None to delete.
    chunks: dict[tuple[bytes, int], bytes | None] = field(default_factory=dict)


#: Records for (topic, partition): complete records or remnants.
Outputs = list[tuple[Any, int, Sequence[OutRecord]]]


class ChangeSet:
    """One unit of work on the session buffers, taken through its steps in order.

    open -> prepared (states encoded once: the same bytes go to the changelog and
    to RocksDB) -> delivered (step 1) -> logged (step 2) -> committed (step 3).
    Each step refuses to run out of order.
    """

    def __init__(
        self,
        partitions: dict[int, PartitionChanges] | None = None,
        outputs: Outputs | None = None,
        dead_letters: Sequence[DeadLetter] = (),
    ) -> None:
        self.partitions = partitions or {}
        self.outputs = outputs or []
        self.dead_letters = dead_letters
        self.step = "open"
        self._encoded: dict[int, dict[bytes, bytes | None]] = {}

    def _advance(self, expected: str, to: str) -> None:
        if self.step != expected:
            raise RuntimeError(f"change set is {self.step}, cannot become {to}")
        self.step = to

    def prepare(self) -> None:
        """Encode every new state: nothing leaves the process yet."""
        self._advance("open", "prepared")
        self._encoded = {
            partition: {
                sid: None if state is None else state.encode()
                for sid, state in change.writes.items()
            }
            for partition, change in self.partitions.items()
        }

    def delivered(self) -> None:
        """Mark step 1 done: the broker has every output, remnant and dead letter."""
        self._advance("prepared", "delivered")

    def changelog_records(self, changelog: str) -> Iterator[Send]:
        """Yield the changelog records of step 2 per (topic, partition), each built when asked.

        The delivery hands each partition's over before it asks for the next one's, and
        lets the event loop in between.
        """
        for partition, change in self.partitions.items():
            # Markers before buffers: the changelog is written in order per partition, so a
            # crash never leaves an expired session's tombstone without its flush marker.
            records: list[Outgoing] = [
                (keys.marker_key(session_id), marker, ())
                for session_id, marker in change.markers.items()
            ]
            # A buffer's new chunks before it, the chunks it dropped after it: a crash
            # between the two leaves a buffer whose chunks are all there.
            records += [
                (keys.chunk_key(session_id, index), chunk, ())
                for (session_id, index), chunk in change.chunks.items()
                if chunk is not None
            ]
            records += [
                (keys.buffer_key(session_id), value, ())
                for session_id, value in self._encoded[partition].items()
            ]
            records += [
                (keys.chunk_key(session_id, index), None, ())
                for (session_id, index), chunk in change.chunks.items()
                if chunk is None
            ]
            if change.watermark is not None:
                records.append((keys.WATERMARK_KEY, keys.encode_offset(change.watermark), ()))
            if records:
                yield (changelog, partition), records

    def write_batch(self, partition: int) -> PreparedWrite:
        """Return a partition's RocksDB write batch for step 3, all but its offset."""
        change = self.partitions[partition]
        return prepare_write(
            change.writes,
            change.before,
            self._encoded[partition],
            change.markers,
            change.watermark,
            change.chunks,
        )

    def logged(self) -> None:
        """Mark step 2 done: the changelog has every change."""
        self._advance("delivered", "logged")

    def committed(self) -> None:
        """Mark step 3 done: RocksDB has every change; the input offsets may be committed."""
        self._advance("logged", "committed")


class Pipeline:
    """Applies batches of fragments and commits every change to the session buffers."""

    def __init__(
        self,
        app: Any,
        settings: Settings,
        table: Any,
        topics: SessionTopics,
        delivery: Delivery,
        totals: PipelineTotals,
        capacity: CapacityMonitor,
    ) -> None:
        self.app = app
        self.settings = settings
        self.table = table
        self.topics = topics
        self.delivery = delivery
        self.totals = totals
        self.capacity = capacity
        #: Serialises every change to the session buffers: batches, sweeps, flush recovery.
        self.lock = asyncio.Lock()
        self.clock = ActivityClock()
        #: The most fragments one batch has held (bounded by SESSIONS_BATCH_FRAGMENTS).
        self.largest_batch = 0
        #: Set when RocksDB first refuses a write; the worker stops applying then.
        self.store_failure: StoreFailure | None = None
        #: Per input partition: the last offset applied and how many fragments, with when.
        self.progress = PartitionProgress()

    @property
    def store(self) -> SessionStore:
        """Return the session buffers' RocksDB store."""
        return self.table.data  # type: ignore[no-any-return]

    def active_partitions(self) -> list[int]:
        """Return the table partitions this worker is active for (not standby)."""
        # Input and table are co-partitioned: the active table partitions are the input's.
        source = self.settings.input_topic
        open_partitions = self.store.open_partitions()
        return sorted(
            tp.partition
            for tp in self.app.consumer.assignment()
            if tp.topic == source and tp.partition in open_partitions
        )

    def live_sessions(self) -> dict[int, int]:
        """Return live sessions per active partition, from the stored counters."""
        store = self.store
        live: dict[int, int] = {}
        for partition in self.active_partitions():
            opened = store.partition(partition)
            if opened is not None:
                live[partition] = opened.live_count()
        return live

    async def process(self, consumed: ByPartition) -> None:
        """Apply one batch of consumed fragments, then send and persist what it produced."""
        settings = self.settings
        store = self.store
        now_us = self.clock.stamp(int(time.time() * 1_000_000), fragments_in(consumed))
        live = sum(self.live_sessions().values())
        reject = settings.cap_policy == "reject"
        results: dict[int, BatchResult] = {}
        applied: list[int] = []
        owners: dict[int, PartitionStore | None] = {}
        for partition, fragments in consumed.items():
            opened = owners[partition] = store.partition(partition)
            if opened is None:  # revoked: the new owner reads these fragments again
                continue
            batch = PartitionBatch(
                opened.loader(),
                settings.delimiter,
                max_buffer_bytes=settings.max_buffer_bytes,
                may_open=max(settings.max_sessions - live, 0) if reject else None,
                applied_through=opened.watermark(),
                load_chunks=opened.chunk_loader(),
            )
            # A batch takes up to SESSIONS_BATCH_FRAGMENTS: let timers, probes and the web
            # view in between slices (the lock keeps other changes out).
            for start in range(0, len(fragments), SLICE_FRAGMENTS):
                batch.apply(fragments[start : start + SLICE_FRAGMENTS], now_us + start)
                await asyncio.sleep(0)
                if store.partition(partition) is not opened:
                    break  # revoked meanwhile: dropped below
            now_us += len(fragments)
            results[partition] = batch.result
            applied.append(partition)
            live += batch.result.live_delta
        if self._drop_revoked(results, applied, owners):
            # The new owner reads these fragments again: the count of live sessions is
            # taken anew.
            live = self._live_after(results)
        evictions: Counter[int] = Counter()
        for _ in range(EVICTION_ROUNDS):
            if reject or live <= settings.max_sessions:
                break
            evicted = await self._evict(results, live - settings.max_sessions, owners)
            evictions.update(evicted)
            # The eviction lets the event loop in: drop what a partition revoked meanwhile
            # produced, with no await between the last check and the sends (ChangeSet
            # steps). A partition revoked meanwhile kept the sessions it was to lose: the
            # count is taken anew, and the next round evicts elsewhere.
            self._drop_revoked(results, applied, owners)
            live = self._live_after(results)
            if not evicted:
                break

        topics = self.topics
        change = ChangeSet(
            {
                p: PartitionChanges(
                    r.writes,
                    r.before,
                    watermark=r.applied_through if p in applied else None,
                    chunks=r.chunks,
                )
                for p, r in results.items()
            },
            [(topics.records, p, r.records) for p, r in results.items()]
            + [(topics.expired, p, r.expired) for p, r in results.items()],
            [letter for r in results.values() for letter in r.dead_letters],
        )
        await self.commit(change)
        # Counted once delivered and persisted: a total seen in the stats is done.
        totals = self.totals
        batch_size = sum(len(consumed[p]) for p in applied)
        now = time.time()
        for partition in applied:
            fragments = consumed[partition]
            self.progress.applied(partition, fragments[-1].offset, len(fragments), now)
        totals.fragments_consumed += batch_size
        totals.batches_applied += 1
        self.largest_batch = max(self.largest_batch, batch_size)
        totals.sessions_evicted += sum(evictions[p] for p in results)
        for result in results.values():
            totals.fragments_replayed += result.fragments_replayed
            totals.records_emitted += len(result.records)
            totals.sessions_opened += result.sessions_opened
            totals.sessions_closed += result.sessions_closed
            totals.sessions_overflowed += result.overflows
            totals.dead_letters += len(result.dead_letters)
        await self.check_capacity()

    def _live_after(self, results: dict[int, BatchResult]) -> int:
        """Return the live sessions once these results are written."""
        stored = sum(self.live_sessions().values())
        return stored + sum(result.live_delta for result in results.values())

    def _drop_revoked(
        self,
        results: dict[int, BatchResult],
        applied: list[int],
        owners: dict[int, PartitionStore | None],
    ) -> bool:
        """Drop what partitions revoked (or revoked and reopened) since `owners` produced.

        Their `owners` entries go too: a partition reopened holds no change of this batch
        any more, and a later eviction round may take sessions from it. Return whether any
        results were dropped.
        """
        store = self.store
        revoked = [p for p, opened in owners.items() if store.partition(p) is not opened]
        dropped = False
        for partition in revoked:
            del owners[partition]
            dropped = results.pop(partition, None) is not None or dropped
            if partition in applied:
                applied.remove(partition)
        return dropped

    async def _evict(
        self,
        results: dict[int, BatchResult],
        how_many: int,
        owners: dict[int, PartitionStore | None],
    ) -> Counter[int]:
        """Expire the `how_many` longest-idle sessions, so the cap holds after the batch.

        Reads and victims go in steps of `EVICTION_STEP`, the event loop let in between;
        a partition revoked meanwhile loses its evictions (the caller drops its results).
        `owners` gains every partition a victim is taken from, with the instance it is
        read from. Return the sessions evicted per partition.
        """
        store = self.store
        sources: dict[int, PartitionStore] = {}
        for partition in sorted({*self.active_partitions(), *results}):
            opened = store.partition(partition)
            if opened is not None and owners.setdefault(partition, opened) is opened:
                sources[partition] = opened
        indexes = [
            _candidates(
                partition,
                opened.idle(skip=results[partition].writes if partition in results else {}),
            )
            for partition, opened in sources.items()
        ]
        # The partitions' idle indexes merged, longest idle first: `how_many` keys read in
        # all, not `how_many` from each partition. Their iterators end here, before any
        # turn of the event loop.
        stored = list(itertools.islice(heapq.merge(*indexes), how_many))
        del indexes
        touched_states = {
            (partition, session_id): state
            for partition, result in results.items()
            for session_id, state in result.writes.items()
            if state is not None
        }
        recent = (
            [(s.last_seen_us, p, sid) for (p, sid), s in touched_states.items()]
            if len(stored) < how_many
            else []
        )
        chosen = choose_evictions(stored, recent, how_many)
        # The stored victims' states, read a step at a time.
        unread: dict[int, list[bytes]] = {}
        for _, partition, session_id in chosen:
            if (partition, session_id) not in touched_states:
                unread.setdefault(partition, []).append(session_id)
        read: dict[tuple[int, bytes], SessionState | None] = {}
        for partition, session_ids in unread.items():
            opened = sources[partition]
            for start in range(0, len(session_ids), EVICTION_STEP):
                await asyncio.sleep(0)
                if store.partition(partition) is not opened:
                    break  # revoked meanwhile: its results are dropped
                step = session_ids[start : start + EVICTION_STEP]
                read.update(
                    zip(((partition, sid) for sid in step), opened.states(step), strict=True)
                )
        loaders = {p: opened.chunk_loader(going=True) for p, opened in sources.items()}
        evictions: Counter[int] = Counter()
        for start in range(0, len(chosen), EVICTION_STEP):
            await asyncio.sleep(0)
            # Partitions revoked meanwhile lose their evictions: their results are dropped.
            held = {p for p, opened in sources.items() if store.partition(p) is opened}
            for _, partition, session_id in chosen[start : start + EVICTION_STEP]:
                if partition not in held:
                    continue
                victim = touched_states.get((partition, session_id))
                if victim is None:
                    victim = read.get((partition, session_id))
                if victim is None:
                    continue
                evicted = results.setdefault(partition, BatchResult())
                evicted.before.setdefault(session_id, victim)
                evicted.writes[session_id] = None
                pending = pending_of(session_id, victim, evicted.chunks, loaders[partition])
                if pending:
                    evicted.expired.append(remnant(session_id, pending, victim.next_seq, "evicted"))
                drop_chunks(session_id, victim, evicted.chunks)
                evictions[partition] += 1
        return evictions

    async def commit(self, change: ChangeSet) -> None:
        """Take a change set through its steps, in the order of README's delivery guarantee.

        Work that needs no broker (encoding, building write batches) is done while
        the broker acknowledges the step before.
        """
        if self.store_failure is not None:
            raise StoreRefused(self.store_failure.cause)
        store = self.store
        # The instances the change was made against: a partition revoked before its write,
        # or revoked and reopened (recovered from the changelog, this change included), is
        # left to the changelog.
        owners = {partition: store.partition(partition) for partition in change.partitions}
        delivery = self.delivery
        # 1. Outputs, remnants and dead letters handed over; states encoded meanwhile; acked.
        outputs = await delivery.send(change.outputs, change.dead_letters)
        change.prepare()
        await outputs.delivered()
        change.delivered()
        # 2. Changed buffers, flush markers and watermarks to the changelog; write batches
        #    built meanwhile; acked.
        changelog = self.table.changelog_topic.get_topic_name()
        logged = await delivery.hand_over(change.changelog_records(changelog))
        batches: dict[int, PreparedWrite] = {}
        for partition in change.partitions:
            # A partition at a time, letting timers and the web view in between.
            await asyncio.sleep(0)
            batches[partition] = change.write_batch(partition)
        offsets = {p: offset for (_, p), offset in (await logged.delivered()).items()}
        firsts = {p: offset for (_, p), offset in logged.first.items()}
        change.logged()
        # 3. One atomic RocksDB write per partition, with the changelog offset it reached.
        #    Partitions that lose sessions first, so the cap holds even between two writes.
        for partition in sorted(offsets, key=lambda p: batches[p].delta):
            opened = store.partition(partition)
            if opened is None or opened is not owners[partition]:
                logger.info(
                    "Partition %d revoked before its write; left to the changelog", partition
                )
                continue
            # RocksDB lets go of the GIL while it writes: the event loop runs meanwhile (the
            # lock keeps other changes out) rather than stall for tens of ms.
            written = await asyncio.to_thread(
                _written_or_refused,
                opened,
                batches[partition],
                offsets[partition],
                firsts.get(partition),
            )
            if isinstance(written, Exception):
                self.store_failure = StoreFailure(str(written), time.time())
                logger.error(
                    "The session store refuses writes (%s): applying stops; the changelog "
                    "holds every change for the worker that recovers it",
                    written,
                )
                raise StoreRefused(str(written)) from written
            if not written:
                logger.info(
                    "Partition %d recovered this change from the changelog before its write",
                    partition,
                )
        change.committed()
        # 4. The caller acks the input offsets: Faust commits them only now.

    async def check_capacity(self) -> None:
        """Feed the live count to the capacity alarm; report a transition if there is one."""
        await self.capacity.update(sum(self.live_sessions().values()))
