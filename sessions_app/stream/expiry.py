"""Idle expiry: sessions silent for SESSIONS_IDLE_TIMEOUT are flushed and deleted, off the heap.

The deadlines live in RocksDB (the idle index of sessions_app/core/keys.py),
so Python holds nothing per session, and they survive restarts and
rebalances: the index is kept in step with the changelog whenever Faust
recovers a partition. A sweep takes at most `Tuning.sweep_batch` sessions
under the buffers lock at a time, so the agent keeps flowing between steps.

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

from aiokafka import AIOKafkaConsumer, TopicPartition
from mode import Service

from sessions_app.core import keys
from sessions_app.core.batch import OutRecord, drop_chunks, remnant
from sessions_app.settings import Settings
from sessions_app.stream.pipeline import ChangeSet, PartitionChanges, Pipeline, StoreRefused

logger = logging.getLogger(__name__)


class ExpiredTopicReader(Service):
    """A consumer of the expired topic, for flush markers: where it ends, what it holds.

    Connected on first use (most workers never need it) and closed with the worker.
    """

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self._consumer: AIOKafkaConsumer | None = None
        self._connecting = asyncio.Lock()

    async def _client(self) -> AIOKafkaConsumer:
        async with self._connecting:
            if self._consumer is None:
                consumer = AIOKafkaConsumer(
                    enable_auto_commit=False, **self.settings.kafka_client_options()
                )
                await consumer.start()
                self._consumer = consumer
        return self._consumer

    async def on_stop(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            await consumer.stop()

    async def end_offsets(self, partitions: list[int]) -> dict[int, int]:
        """Return an offset at or before the end of each expired-topic partition."""
        consumer = await self._client()
        tps = [TopicPartition(self.settings.expired_topic, p) for p in partitions]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: offset for tp, offset in ends.items()}

    async def flushes_present(
        self, partition: int, start: int, wanted: set[tuple[bytes, int]]
    ) -> set[tuple[bytes, int]]:
        """Read the expired topic's partition from `start` to its end; return wanted flushes."""
        consumer = await self._client()
        tp = TopicPartition(self.settings.expired_topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        found: set[tuple[bytes, int]] = set()
        deadline = time.monotonic() + self.settings.tuning.flush_scan_timeout
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
        raise TimeoutError(f"could not read {self.settings.expired_topic}[{partition}] to its end")


class IdleExpiry(Service):
    """Sweeps idle sessions out, and settles idle flushes a crash interrupted."""

    def __init__(self, app: Any, pipeline: Pipeline, settings: Settings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.pipeline = pipeline
        self.settings = settings
        self.reader = ExpiredTopicReader(settings)

    def on_init_dependencies(self) -> list[Service]:
        return [self.reader]

    @Service.task
    async def _sweep_periodically(self) -> None:
        async for _ in self.itertimer(self.settings.sweep_interval, name="expire_idle_sessions"):
            await self.expire_idle_sessions()

    async def expire_idle_sessions(self) -> None:
        """Flush and delete every session idle for longer than SESSIONS_IDLE_TIMEOUT."""
        while self.ready() and self.pipeline.store_failure is None:
            async with self.pipeline.lock:
                try:
                    done = await self.sweep_step()
                except StoreRefused:
                    return  # the partition monitor stops the worker; a restart recovers
                except Exception as exc:
                    # Half a sweep step must not be followed by another: stop the worker,
                    # and the flush markers settle what the step left when it restarts.
                    logger.critical("An idle sweep failed; stopping the worker: %r", exc)
                    await self.app.crash(exc)
                    return
            if done:
                return
            await asyncio.sleep(0)

    def ready(self) -> bool:
        """Tell whether the tables are recovered and no rebalance is under way."""
        recovery: Any = self.app.tables.recovery
        return not self.app.rebalancing and bool(recovery.completed.is_set())

    async def sweep_step(self) -> bool:
        """Expire up to `Tuning.sweep_batch` idle sessions; return True when none are left."""
        pipeline, store = self.pipeline, self.pipeline.store
        partitions = pipeline.active_partitions()
        for partition in partitions:
            opened = store.partition(partition)
            markers = {} if opened is None else opened.markers()
            if markers:
                await self.resolve_markers(partition, markers)
                return False
        cutoff = int((time.time() - self.settings.idle_timeout) * 1_000_000)
        room = self.settings.tuning.sweep_batch
        victims: dict[int, list[bytes]] = {}
        for partition in partitions:
            opened = store.partition(partition)
            if opened is None or room == 0:
                continue
            idle = opened.oldest(room, before_us=cutoff + 1)
            if idle:
                victims[partition] = [session_id for _, session_id in idle]
                room -= len(idle)
        if not victims:
            return True
        scan_from = await self.reader.end_offsets(list(victims))
        changes: dict[int, PartitionChanges] = {}
        flushes: dict[int, list[OutRecord]] = {}
        for partition, session_ids in victims.items():
            opened = store.partition(partition)
            if opened is None:
                continue
            change = changes[partition] = PartitionChanges()
            for session_id, state in zip(session_ids, opened.states(session_ids), strict=True):
                if state is None:
                    continue
                change.writes[session_id] = None
                change.before[session_id] = state
                pending = opened.pending(session_id, state)
                drop_chunks(session_id, state, change.chunks)
                if pending:
                    marker = keys.FlushMarker(scan_from[partition], state.next_seq, pending)
                    change.markers[session_id] = marker.encode()
                    flushes.setdefault(partition, []).append(
                        remnant(session_id, pending, state.next_seq, "idle")
                    )
        expired = pipeline.topics.expired
        await pipeline.commit(ChangeSet(changes))
        await pipeline.commit(ChangeSet(outputs=[(expired, p, r) for p, r in flushes.items()]))
        await pipeline.commit(
            ChangeSet(
                {
                    p: PartitionChanges(markers={r.key: None for r in records})
                    for p, records in flushes.items()
                }
            )
        )
        pipeline.totals.sessions_expired += sum(len(c.writes) for c in changes.values())
        await pipeline.check_capacity()
        return room > 0

    async def resolve_interrupted_flushes(self, partitions: set[int]) -> None:
        """Finish the idle flushes a crash interrupted in these partitions, if any.

        Called before fragments of a partition are applied, so a session a crash left
        half-expired is settled before any new fragment can reach it.
        """
        store = self.pipeline.store
        for partition in sorted(partitions):
            opened = store.partition(partition)
            markers = {} if opened is None else opened.markers()
            if markers:
                await self.resolve_markers(partition, markers)

    async def resolve_markers(self, partition: int, markers: dict[bytes, keys.FlushMarker]) -> None:
        """Finish idle flushes a crash interrupted: send each remnant the expired topic lacks.

        A marker whose session still has its buffer was written, but the tombstone after
        it never reached the changelog: that expiry did not happen and nothing was flushed
        (flushes are sent only once both are in), so the marker is dropped and the session
        lives on. A marker whose buffer is gone is a flush that may or may not have been sent.
        """
        pipeline = self.pipeline
        opened = pipeline.store.partition(partition)
        if opened is None:
            return
        live = {sid for sid in markers if opened.has_session(sid)}
        done = {sid: m for sid, m in markers.items() if sid not in live}
        present: set[tuple[bytes, int]] = set()
        if done:
            start = min(m.scan_from for m in done.values())
            wanted = {(session_id, m.seq) for session_id, m in done.items()}
            present = await self.reader.flushes_present(partition, start, wanted)
        missing = [
            remnant(session_id, m.pending, m.seq, "idle")
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
            self.settings.expired_topic,
            len(missing),
        )
        await pipeline.commit(ChangeSet(outputs=[(pipeline.topics.expired, partition, missing)]))
        await pipeline.commit(
            ChangeSet({partition: PartitionChanges(markers={sid: None for sid in markers})})
        )
        pipeline.totals.interrupted_flushes_settled += len(done)
