"""The reassembly agent: take the input a fetch at a time and hand it to the pipeline.

Faust's Stream and consumer loop cost tens of microseconds per event; the
app's consumer (sessions_app.intake) hands this agent whole fetches instead,
and the agent acks a batch only once sessions_app.pipeline has delivered and
persisted it.
"""

from __future__ import annotations

from typing import Any

from sessions_app.app import app, settings
from sessions_app.batch import ByPartition
from sessions_app.expiry import resolve_interrupted_flushes
from sessions_app.intake import IntakeConsumer
from sessions_app.pipeline import buffers_lock, process_fragments
from sessions_app.topics import (
    alerts_topic,
    dead_letter_topic,
    expired_topic,
    fragments_topic,
    records_topic,
)

# A batch is what has been fetched when the previous one is done, at most
# SESSIONS_BATCH_FRAGMENTS: larger batches cost less CPU per fragment, and the Python
# heap keeps the high-water mark of what a batch builds (README, "Bounded memory").
BATCH_MAX_FRAGMENTS = settings.batch_fragments


@app.agent(fragments_topic)
async def reassemble_sessions(stream: Any) -> None:
    """Turn fragments into complete records, one batch at a time."""
    for topic in (records_topic, expired_topic, dead_letter_topic, alerts_topic):
        await topic.maybe_declare()
    # Subscribes the input topic; its records arrive through the consumer's intake.
    stream.channel.__aiter__()
    consumer: IntakeConsumer = app.consumer  # type: ignore[assignment]
    intake = consumer.intake
    flow_control = app.flow_control
    lock = buffers_lock()
    source = fragments_topic.get_topic_name()
    while True:
        fetches = [await intake.get()]
        size = _size(fetches[0][1])
        while size < BATCH_MAX_FRAGMENTS and not intake.empty():
            fetches.append(intake.get_nowait())
            size += _size(fetches[-1][1])
        # Rebalancing: wait; drop fetches from before it (recovery seeks, they come again)
        # and what belongs to partitions no longer ours.
        await flow_control.acquire()
        now = app.consumer_generation_id
        mine = {tp.partition for tp in consumer.assignment() if tp.topic == source}
        batch: ByPartition = {}
        for generation, fetched in fetches:
            if consumer.is_current(generation):
                for partition, fragments in fetched.items():
                    if partition in mine:
                        batch.setdefault(partition, []).extend(fragments)
        if batch:
            async with lock:
                await resolve_interrupted_flushes(set(batch))
                await process_fragments(batch)
            # A rebalance while the batch was applied: leave it unacked. Its partitions were
            # seeked back to their committed offsets and read it again (skipped as applied);
            # an ack now would count offsets of partitions that moved or came back.
            if consumer.is_current(now):
                consumer.ack_records(batch)


def _size(fetched: ByPartition) -> int:
    return sum(len(fragments) for fragments in fetched.values())
