"""The reassembly agent: take the input a fetch at a time and hand it to the pipeline.

Faust's Stream and consumer loop cost tens of microseconds per event; the
app's consumer (sessions_app.engine.intake) hands this agent whole fetches
instead, and the agent acks a batch only once the pipeline has delivered and
persisted it. Found by Faust's autodiscover (sessions_app.app.DISCOVERED).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sessions_app.app import app
from sessions_app.core.batch import ByPartition
from sessions_app.engine.allocator import collector_held_off
from sessions_app.engine.intake import Batches, IntakeConsumer
from sessions_app.stream.pipeline import StoreRefused

logger = logging.getLogger(__name__)


@app.agent(app.session_topics.fragments)
async def reassemble_sessions(stream: Any) -> None:
    """Turn fragments into complete records, one batch at a time."""
    for topic in app.session_topics.outputs():
        await topic.maybe_declare()
    # Subscribes the input topic; its records arrive through the consumer's intake.
    stream.channel.__aiter__()
    consumer: IntakeConsumer = app.consumer  # type: ignore[assignment]
    flow_control = app.flow_control
    pipeline, expiry = app.pipeline, app.idle_expiry
    source = app.settings.input_topic
    # Batches of at most SESSIONS_BATCH_FRAGMENTS: larger batches cost less CPU per
    # fragment, and the Python heap keeps the high-water mark of what a batch builds
    # (README, "Bounded memory").
    batches = Batches(consumer.intake, app.settings.batch_fragments)
    while True:
        fetches = await batches.next()
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
            try:
                async with pipeline.lock:
                    await expiry.resolve_interrupted_flushes(set(batch))
                    # The batch's objects live until it is done: the collector would only
                    # scan them again and again (engine/allocator.py).
                    with collector_held_off():
                        await pipeline.process(batch)
            except StoreRefused:
                # RocksDB refuses every write until reopened: apply nothing more, ack nothing.
                # The alarm is up; the partition monitor stops the worker after
                # SESSIONS_STALL_TIMEOUT, and a restart recovers from the changelog.
                await asyncio.Event().wait()
            except Exception as exc:
                # A batch that failed half-way must never be followed by the next one: Faust
                # would restart this agent on the next fetch, and sessions would go on
                # without the failed batch's fragments. Stop the worker instead: nothing
                # of the batch was acked, so a restart reads it again.
                logger.critical("A batch failed; stopping the worker: %r", exc, exc_info=exc)
                await app.crash(exc)
                await asyncio.Event().wait()
            # A rebalance while the batch was applied: leave it unacked. Its partitions were
            # seeked back to their committed offsets and read it again (skipped as applied);
            # an ack now would count offsets of partitions that moved or came back.
            if consumer.is_current(now):
                consumer.ack_records(batch)
