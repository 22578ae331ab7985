"""Idle expiry: sessions silent for SESSIONS_IDLE_TIMEOUT are flushed and deleted, off the heap.

The deadlines live in RocksDB (the idle index of sessions_app/keys.py), so
Python holds nothing per session, and they survive restarts and rebalances:
the index is kept in step with the changelog whenever Faust recovers a
partition. A sweep takes at most SWEEP_BATCH sessions under the buffers
lock at a time, so the agent keeps flowing between steps.

Each idle flush goes in three steps: (1) the buffer's tombstone and a flush
marker reach the changelog and RocksDB, (2) the remnant reaches the expired
topic, (3) the marker is deleted. A marker found after a crash is resolved
by reading the expired topic from the offset the marker holds: the remnant
is sent only if it is not there. So a flush is neither lost nor repeated,
and an expired session never comes back from the changelog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sessions_app import keys
from sessions_app.app import app, settings
from sessions_app.batch import OutRecord, remnant
from sessions_app.counters import totals
from sessions_app.pipeline import (
    Changes,
    active_partitions,
    buffers_lock,
    check_capacity,
    deliver,
    persist,
    store,
)
from sessions_app.session_state import SessionState
from sessions_app.topics import expired_topic

logger = logging.getLogger(__name__)

SWEEP_BATCH = 1000
SWEEP_INTERVAL = min(1.0, settings.idle_timeout / 4)


@app.timer(interval=SWEEP_INTERVAL)  # type: ignore[untyped-decorator]
async def expire_idle_sessions() -> None:
    """Flush and delete every session idle for longer than SESSIONS_IDLE_TIMEOUT."""
    while ready():
        async with buffers_lock():
            done = await sweep_step()
        if done:
            return
        await asyncio.sleep(0)


def ready() -> bool:
    """Tell whether the tables are recovered and no rebalance is under way."""
    recovery: Any = app.tables.recovery  # type: ignore[attr-defined]
    return not app.rebalancing and bool(recovery.completed.is_set())


async def sweep_step() -> bool:
    """Expire up to SWEEP_BATCH idle sessions; return True when none are left."""
    data = store()
    partitions = active_partitions()
    for partition in partitions:
        markers = _markers(partition)
        if markers:
            await resolve_markers(partition, markers)
            return False
    cutoff = int((time.time() - settings.idle_timeout) * 1_000_000)
    bound = keys.idle_bound(cutoff + 1)
    victims: dict[int, list[bytes]] = {}
    found = 0
    for partition in partitions:
        db = data.open_db(partition)
        if db is None:
            continue
        for key in db.keys(from_key=keys.IDLE):
            if key >= bound or found >= SWEEP_BATCH:
                break
            victims.setdefault(partition, []).append(keys.parse_idle_key(key)[1])
            found += 1
    if not victims:
        return True
    scan_from = await end_offsets(list(victims))
    changes: dict[int, Changes] = {}
    flushes: dict[int, list[OutRecord]] = {}
    for partition, session_ids in victims.items():
        db = data.open_db(partition)
        if db is None:
            continue
        change = changes[partition] = Changes()
        for session_id in session_ids:
            raw = db.get(keys.buffer_key(session_id))
            if raw is None:
                continue
            state = SessionState.decode(raw)
            change.writes[session_id] = None
            change.before[session_id] = state
            if state.pending:
                marker = keys.FlushMarker(scan_from[partition], state.next_seq, state.pending)
                change.markers[session_id] = marker.encode()
                flushes.setdefault(partition, []).append(remnant(session_id, state, "idle"))
    await persist(changes)
    await deliver([(expired_topic, p, records) for p, records in flushes.items()])
    await persist(
        {p: Changes(markers={r.key: None for r in records}) for p, records in flushes.items()}
    )
    totals.sessions_expired += sum(len(c.writes) for c in changes.values())
    await check_capacity()
    return found < SWEEP_BATCH


def _markers(partition: int) -> dict[bytes, keys.FlushMarker]:
    markers: dict[bytes, keys.FlushMarker] = {}
    db = store().open_db(partition)
    if db is None:
        return markers
    for key, value in db.items(from_key=keys.MARKER):
        if key[:1] != keys.MARKER:
            break
        markers[key[1:]] = keys.FlushMarker.decode(value)
    return markers


async def resolve_interrupted_flushes(partitions: set[int]) -> None:
    """Finish the idle flushes a crash interrupted in these partitions, if any.

    Called before fragments of a partition are applied, so a session a crash left
    half-expired is settled before any new fragment can reach it.
    """
    for partition in sorted(partitions):
        markers = _markers(partition)
        if markers:
            await resolve_markers(partition, markers)


async def resolve_markers(partition: int, markers: dict[bytes, keys.FlushMarker]) -> None:
    """Finish idle flushes a crash interrupted: send each remnant the expired topic lacks.

    A marker whose session still has its buffer was written, but the tombstone after it
    never reached the changelog: that expiry did not happen and nothing was flushed
    (flushes are sent only once both are in), so the marker is dropped and the session
    lives on. A marker whose buffer is gone is a flush that may or may not have been sent.
    """
    db = store().open_db(partition)
    if db is None:
        return
    live = {sid for sid in markers if db.get(keys.buffer_key(sid)) is not None}
    done = {sid: m for sid, m in markers.items() if sid not in live}
    present: set[tuple[bytes, int]] = set()
    if done:
        start = min(m.scan_from for m in done.values())
        wanted = {(session_id, m.seq) for session_id, m in done.items()}
        present = await _flushes_present(partition, start, wanted)
    missing = [
        remnant(session_id, SessionState(next_seq=m.seq, pending=m.pending), "idle")
        for session_id, m in done.items()
        if (session_id, m.seq) not in present
    ]
    logger.info(
        "Partition %d: %d interrupted idle flushes (%d never took effect), %d already on %s,"
        " sending %d",
        partition,
        len(markers),
        len(live),
        len(present),
        settings.expired_topic,
        len(missing),
    )
    await deliver([(expired_topic, partition, missing)])
    await persist({partition: Changes(markers={session_id: None for session_id in markers})})


_reader: Any = None


async def _consumer() -> Any:
    global _reader
    if _reader is None:
        from aiokafka import AIOKafkaConsumer

        _reader = AIOKafkaConsumer(
            bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False
        )
        await _reader.start()
    return _reader


@app.on_before_shutdown.connect  # type: ignore[arg-type]
async def _close_reader(app: Any, **kwargs: Any) -> None:
    global _reader
    if _reader is not None:
        reader, _reader = _reader, None
        await reader.stop()


async def end_offsets(partitions: list[int]) -> dict[int, int]:
    """Return an offset at or before the end of each expired-topic partition."""
    from aiokafka import TopicPartition

    consumer = await _consumer()
    tps = [TopicPartition(settings.expired_topic, p) for p in partitions]
    ends = await consumer.end_offsets(tps)
    return {tp.partition: offset for tp, offset in ends.items()}


async def _flushes_present(
    partition: int, start: int, wanted: set[tuple[bytes, int]]
) -> set[tuple[bytes, int]]:
    """Read the expired topic's partition from `start` to its end; return wanted flushes found."""
    from aiokafka import TopicPartition

    consumer = await _consumer()
    tp = TopicPartition(settings.expired_topic, partition)
    consumer.assign([tp])
    consumer.seek(tp, start)
    found: set[tuple[bytes, int]] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        batch = await consumer.getmany(tp, timeout_ms=500, max_records=10_000)
        for record in batch.get(tp, []):
            headers = dict(record.headers)
            if headers.get("reason") == b"idle":
                item = (record.key, int(headers.get("seq", b"-1")))
                if item in wanted:
                    found.add(item)
        highwater = consumer.highwater(tp)
        if highwater is not None and await consumer.position(tp) >= highwater:
            return found
    raise TimeoutError(f"could not read {settings.expired_topic}[{partition}] to its end")
