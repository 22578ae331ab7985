"""Apply, send, persist: the one path every change to the session buffers takes.

The agent's batches, idle expiry and eviction all go through here, under one
lock, in the same order: outputs delivered, then changelog delivered, then
one RocksDB write batch per partition. See README, "Delivery guarantee".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sessions_app import keys
from sessions_app.app import app, settings
from sessions_app.batch import (
    ActivityClock,
    BatchResult,
    ByPartition,
    OutRecord,
    apply_fragments,
    remnant,
)
from sessions_app.counters import totals
from sessions_app.monitoring import capacity
from sessions_app.session_state import SessionState
from sessions_app.store import SessionStore, prepare_write
from sessions_app.tables import session_buffers
from sessions_app.topics import dead_letter_topic, expired_topic, records_topic


@dataclass
class Changes:
    """Everything one step wants persisted in one partition."""

    writes: dict[bytes, SessionState | None] = field(default_factory=dict)
    before: dict[bytes, SessionState | None] = field(default_factory=dict)
    markers: dict[bytes, bytes | None] = field(default_factory=dict)
    watermark: int | None = None


_lock: asyncio.Lock | None = None
_clock = ActivityClock()


def buffers_lock() -> asyncio.Lock:
    """Return the lock that serialises every change to the session buffers."""
    global _lock
    if _lock is None:
        _lock = asyncio.Lock()
    return _lock


def store() -> SessionStore:
    """Return the session buffers' RocksDB store."""
    return session_buffers.data  # type: ignore[return-value]


def active_partitions() -> list[int]:
    """Return the table partitions this worker is active for (not standby)."""
    # Input and table are co-partitioned: the active table partitions are the input's.
    source = settings.input_topic
    open_dbs = store()._dbs
    return sorted(
        tp.partition
        for tp in app.consumer.assignment()
        if tp.topic == source and tp.partition in open_dbs
    )


def live_sessions() -> dict[int, int]:
    """Return live sessions per active partition, from the stored counters."""
    data = store()
    return {p: data.live_count(p) for p in active_partitions()}


async def process_fragments(consumed: ByPartition) -> None:
    """Apply one batch of consumed fragments, then send and persist what it produced."""
    by_partition = dict(consumed)
    data = store()
    now_us = _clock.stamp(
        int(time.time() * 1_000_000), sum(len(fragments) for fragments in by_partition.values())
    )
    live = sum(live_sessions().values())
    reject = settings.cap_policy == "reject"
    results: dict[int, BatchResult] = {}
    for partition, fragments in list(by_partition.items()):
        db = data.open_db(partition)
        if db is None:  # revoked: the new owner reads these fragments again
            del by_partition[partition]
            continue

        def load(session_id: bytes, get: Any = db.get) -> bytes | None:
            return get(keys.buffer_key(session_id))  # type: ignore[no-any-return]

        result = apply_fragments(
            fragments,
            load,
            settings.delimiter,
            now_us,
            max_buffer_bytes=settings.max_buffer_bytes,
            may_open=max(settings.max_sessions - live, 0) if reject else None,
            applied_through=data.watermark(partition),
        )
        now_us += len(fragments)
        results[partition] = result
        live += result.live_delta
    if live > settings.max_sessions and not reject:
        _evict(results, live - settings.max_sessions)

    outputs = await send_outputs(
        (
            [(records_topic, p, r.records) for p, r in results.items()]
            + [(expired_topic, p, r.expired) for p, r in results.items()]
        ),
        [dl for r in results.values() for dl in r.dead_letters],
    )
    changes = {
        p: Changes(r.writes, r.before, watermark=r.applied_through if p in by_partition else None)
        for p, r in results.items()
    }
    # Encoded while the outputs are on their way; the changelog goes once they are in.
    encoded = encode(changes)
    await outputs.delivered()
    await persist(changes, encoded)
    # Counted once delivered and persisted: a total seen in the stats is done.
    totals.fragments_consumed += sum(len(f) for f in by_partition.values())
    for result in results.values():
        _count(result)
    await check_capacity()


def _evict(results: dict[int, BatchResult], how_many: int) -> None:
    """Expire the `how_many` longest-idle sessions, so the cap holds after the batch.

    Stored sessions the batch did not touch are the longest idle; when the
    batch opens more sessions than they make room for, the sessions it
    touched earliest go next.
    """
    data = store()
    candidates: list[tuple[int, int, bytes]] = []
    for partition in active_partitions():
        touched = results[partition].writes if partition in results else {}
        taken = 0
        db = data.open_db(partition)
        if db is None:
            continue
        for key in db.keys(from_key=keys.IDLE):
            if key >= keys.IDLE_END or taken >= how_many:
                break
            last_seen, session_id = keys.parse_idle_key(key)
            if session_id not in touched:
                candidates.append((last_seen, partition, session_id))
                taken += 1
    victims: list[tuple[int, bytes, SessionState]] = []
    for _, partition, session_id in sorted(candidates)[:how_many]:
        db = data.open_db(partition)
        raw = None if db is None else db.get(keys.buffer_key(session_id))
        if raw is not None:
            victims.append((partition, session_id, SessionState.decode(raw)))
    if len(victims) < how_many:
        # Touched by this batch: take them in the order they were last touched.
        recent = [
            (state.last_seen_us, partition, session_id, state)
            for partition, result in results.items()
            for session_id, state in result.writes.items()
            if state is not None
        ]
        recent.sort(key=lambda item: item[:3])
        for _, partition, session_id, state in recent[: how_many - len(victims)]:
            victims.append((partition, session_id, state))
    for partition, session_id, victim in victims:
        evicted = results.setdefault(partition, BatchResult())
        evicted.before.setdefault(session_id, victim)
        evicted.writes[session_id] = None
        if victim.pending:
            evicted.expired.append(remnant(session_id, victim, "evicted"))
        totals.sessions_evicted += 1


Outgoing = tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes]]]


@dataclass
class InFlight:
    """Records handed to the producer, in order per partition, not yet known to be in."""

    batches: list[tuple[tuple[str, int], int, Any]] = field(default_factory=list)
    singles: list[Any] = field(default_factory=list)

    async def delivered(self) -> dict[tuple[str, int], int]:
        """Wait until the broker has every record; return each (topic, partition)'s last offset."""
        acked = await asyncio.gather(*(future for _, _, future in self.batches))
        await asyncio.gather(*self.singles)
        last: dict[tuple[str, int], int] = {}
        for (where, count, _), metadata in zip(self.batches, acked, strict=True):
            last[where] = max(last.get(where, -1), metadata.offset + count - 1)
        return last


async def hand_over(sends: dict[tuple[str, int], list[Outgoing]]) -> InFlight:
    """Hand (key, value, headers) lists for their (topic, partition) to the producer.

    Records go into the producer's batches directly, a batch per
    SESSIONS_PRODUCER_MAX_BATCH_SIZE bytes, instead of a coroutine per record
    through Faust's and aiokafka's send(). Order within a partition is kept.
    """
    producer = app.producer._ensure_producer()  # type: ignore[attr-defined]
    in_flight = InFlight()
    for (topic, partition), records in sends.items():
        batch, count = producer.create_batch(), 0
        for key, value, header_items in records:
            headers = list(header_items)  # the record builder takes a list only
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                future = await producer.send_batch(batch, topic, partition=partition)
                in_flight.batches.append(((topic, partition), count, future))
                batch, count = producer.create_batch(), 0
                # An empty batch takes any one record, whatever the size limit.
                batch.append(key=key, value=value, timestamp=None, headers=headers)
            count += 1
        if count:
            batch.close()
            future = await producer.send_batch(batch, topic, partition=partition)
            in_flight.batches.append(((topic, partition), count, future))
    return in_flight


async def send_outputs(
    outputs: Iterable[tuple[Any, int, Sequence[OutRecord]]], dead_letters: Sequence[Any] = ()
) -> InFlight:
    """Hand records for their topics and partitions, and dead letters, to the producer."""
    sends: dict[tuple[str, int], list[Outgoing]] = {}
    for topic, partition, records in outputs:
        if records:
            # An OutRecord is a (key, value, headers) tuple already.
            sends.setdefault((topic.get_topic_name(), partition), []).extend(records)
    producer = app.producer
    dlq = dead_letter_topic.get_topic_name()
    # Dead letters go where the key's partitioner puts them: one send each, they are rare.
    letters = [
        await producer.send(
            dlq, letter.fragment.key, letter.fragment.value, None, None, list(letter.headers())
        )
        for letter in dead_letters
    ]
    in_flight = await hand_over(sends)
    in_flight.singles = letters
    return in_flight


async def deliver(
    outputs: Iterable[tuple[Any, int, Sequence[OutRecord]]], dead_letters: Sequence[Any] = ()
) -> None:
    """Send records to their topics and partitions and wait until the broker has all of them."""
    await (await send_outputs(outputs, dead_letters)).delivered()


Encoded = dict[int, dict[bytes, bytes | None]]


def encode(changes: dict[int, Changes]) -> Encoded:
    """Return each partition's new states in stored form (None deletes)."""
    return {
        partition: {sid: None if s is None else s.encode() for sid, s in change.writes.items()}
        for partition, change in changes.items()
    }


async def persist(changes: dict[int, Changes], encoded: Encoded | None = None) -> None:
    """Send the changes to the changelog, wait, then write each partition's RocksDB batch.

    `encoded` is `encode(changes)` if the caller made it already.
    """
    changelog = session_buffers.changelog_topic.get_topic_name()
    # Encoded once: the same bytes go to the changelog and to RocksDB.
    if encoded is None:
        encoded = encode(changes)
    sends: dict[tuple[str, int], list[Outgoing]] = {}
    for partition, change in changes.items():
        # Markers before buffers: the changelog is written in order per partition, so a
        # crash never leaves an expired session's tombstone without its flush marker.
        records: list[Outgoing] = [
            (keys.marker_key(session_id), marker, ())
            for session_id, marker in change.markers.items()
        ]
        records += [
            (keys.buffer_key(session_id), value, ())
            for session_id, value in encoded[partition].items()
        ]
        if change.watermark is not None:
            records.append((keys.WATERMARK_KEY, keys.encode_offset(change.watermark), ()))
        if records:
            sends[(changelog, partition)] = records
    in_flight = await hand_over(sends)
    # While the changelog is on its way: the RocksDB batches, all but the offset it gets.
    prepared = {
        partition: prepare_write(
            change.writes, change.before, encoded[partition], change.markers, change.watermark
        )
        for partition, change in changes.items()
    }
    last = {partition: offset for (_, partition), offset in (await in_flight.delivered()).items()}
    data = store()
    # Partitions that lose sessions first, so the cap holds even between two writes.
    order = sorted(last, key=lambda p: prepared[p].delta)
    for partition in order:
        data.commit_write(partition, prepared[partition], last[partition])


def _count(result: BatchResult) -> None:
    totals.fragments_replayed += result.fragments_replayed
    totals.records_emitted += len(result.records)
    totals.sessions_opened += result.sessions_opened
    totals.sessions_closed += result.sessions_closed
    totals.sessions_overflowed += result.overflows
    totals.dead_letters += len(result.dead_letters)


async def check_capacity() -> None:
    """Feed the live count to the capacity alarm; report a transition if there is one."""
    await capacity.update(sum(live_sessions().values()))
