"""The reassembly agent: group a batch by partition, apply it (pure), send, then persist.

Order per batch, which is what makes a crash at any point safe:

1. complete records, remnants and dead letters are sent and delivered;
2. the changed buffers are sent to the table's changelog and delivered;
3. the buffers and the changelog offset go to RocksDB in one write batch;
4. only then does Faust ack the batch's input offsets (on the next batch).

A crash before 2 repeats records with the same `seq`; a crash after 2 leaves
buffers whose stored input offset makes the replayed fragments no-ops.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import rocksdict
from faust.types import EventT

from sessions_app.app import app, settings
from sessions_app.batch import BatchResult, Fragment, OutRecord, apply_fragments
from sessions_app.counters import totals
from sessions_app.tables import session_buffers
from sessions_app.topics import dead_letter_topic, expired_topic, fragments_topic, records_topic

# A batch is what arrives within BATCH_WINDOW seconds of its first fragment, at most
# BATCH_MAX_FRAGMENTS: each batch costs two broker round trips, whatever its size.
BATCH_MAX_FRAGMENTS = 5000
BATCH_WINDOW = 0.01


@app.agent(fragments_topic)
async def reassemble_sessions(stream: Any) -> None:
    """Turn fragments into complete records, one batch at a time."""
    for topic in (records_topic, expired_topic, dead_letter_topic):
        await topic.maybe_declare()
    # Faust's Stream costs tens of microseconds per event (processors, context,
    # sensors, one ack each), which capped the worker near 15k fragments/s.
    # The agent drains its channel's queue in batches instead, and acks a
    # batch only once it is delivered and persisted.
    channel = stream.channel.__aiter__()  # subscribes the channel with the conductor
    queue = channel.queue
    consumer = app.consumer
    flow_control = app.flow_control
    while True:
        events = [await queue.get()]
        if queue.qsize() < BATCH_MAX_FRAGMENTS:
            await asyncio.sleep(BATCH_WINDOW)
        while len(events) < BATCH_MAX_FRAGMENTS and not queue.empty():
            events.append(queue.get_nowait())
        # Rebalancing: wait, then drop what belongs to partitions no longer ours.
        await flow_control.acquire()
        assigned = consumer.assignment()
        events = [event for event in events if event.message.tp in assigned]
        if events:
            await process_batch(events)
        for event in events:
            event.message.ack(consumer)


async def process_batch(events: Sequence[EventT[Any]]) -> None:
    """Apply one batch of events, then send and persist what it produced."""
    by_partition: dict[int, list[Fragment]] = defaultdict(list)
    for event in events:
        message = event.message
        by_partition[message.partition].append(
            Fragment(message.topic, message.partition, message.offset, message.key, message.value)
        )
    store: Any = session_buffers.data
    now_ms = int(time.time() * 1000)
    results: dict[int, BatchResult] = {}
    for partition, fragments in by_partition.items():
        db = store._db_for_partition(partition)
        results[partition] = apply_fragments(fragments, db.get, settings.delimiter, now_ms)
        totals.fragments_consumed += len(fragments)

    await _deliver_outputs(results)
    changelog_offsets = await _deliver_changelog(results)
    for partition, result in results.items():
        _persist(store, partition, result, changelog_offsets.get(partition))
        _count(result)


async def _deliver_outputs(results: dict[int, BatchResult]) -> None:
    producer = app.producer
    pending = []
    for partition, result in results.items():
        for topic, records in ((records_topic, result.records), (expired_topic, result.expired)):
            name = topic.get_topic_name()
            for record in records:
                pending.append(await _send(producer, name, record, partition))
        dlq = dead_letter_topic.get_topic_name()
        for letter in result.dead_letters:
            fragment = letter.fragment
            pending.append(
                await producer.send(
                    dlq, fragment.key, fragment.value, None, None, list(letter.headers())
                )
            )
    if pending:
        await asyncio.gather(*pending)


async def _send(producer: Any, topic: str, record: OutRecord, partition: int) -> Any:
    return await producer.send(
        topic, record.key, record.value, partition, None, list(record.headers)
    )


async def _deliver_changelog(results: dict[int, BatchResult]) -> dict[int, int]:
    """Send every changed buffer to the changelog; return the last offset written per partition."""
    producer = app.producer
    changelog = session_buffers.changelog_topic.get_topic_name()
    pending: list[tuple[int, Any]] = []
    for partition, result in results.items():
        for key, state in result.writes.items():
            value = None if state is None else state.encode()
            pending.append(
                (partition, await producer.send(changelog, key, value, partition, None, None))
            )
    delivered = await asyncio.gather(*(fut for _, fut in pending))
    last: dict[int, int] = {}
    for (partition, _), metadata in zip(pending, delivered, strict=True):
        last[partition] = max(last.get(partition, -1), metadata.offset)
    return last


def _persist(store: Any, partition: int, result: BatchResult, changelog_offset: int | None) -> None:
    """Write the batch's buffers and the changelog offset they reach, atomically."""
    if changelog_offset is None:
        return
    batch = rocksdict.WriteBatch(raw_mode=True)
    for key, state in result.writes.items():
        if state is None:
            batch.delete(key)
        else:
            batch.put(key, state.encode())
    # Faust reads this key at recovery and replays the changelog after it.
    batch.put(store.offset_key, str(changelog_offset).encode())
    store._db_for_partition(partition).write(batch)


def _count(result: BatchResult) -> None:
    totals.fragments_replayed += result.fragments_replayed
    totals.records_emitted += len(result.records)
    totals.sessions_opened += result.sessions_opened
    totals.sessions_closed += result.sessions_closed
    totals.remnants_expired += len(result.expired)
    totals.dead_letters += len(result.dead_letters)
