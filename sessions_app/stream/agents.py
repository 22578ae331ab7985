"""The reassembly agent: take the input a fetch at a time and hand it to the pipeline.

Faust's Stream and consumer loop cost tens of microseconds per event; the
app's consumer (sessions_app.engine.intake) hands this agent whole fetches
instead, and the agent acks a batch only once the pipeline has delivered and
persisted it. While a batch's RocksDB writes run (in a thread), the agent
already takes the next batch's fetches, so the consumer thread parses them
meanwhile; the next batch is applied only once the writes are done. Found by
Faust's autodiscover (sessions_app.app.DISCOVERED).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any, NoReturn

from sessions_app.app import app
from sessions_app.core.batch import ByPartition
from sessions_app.engine.allocator import collector_held_off
from sessions_app.engine.intake import Batches, IntakeConsumer
from sessions_app.stream.pipeline import StoreRefused

logger = logging.getLogger(__name__)


def _finished(held: contextlib.ExitStack) -> None:
    """End a batch: the collector may run again, and the buffers' lock goes."""
    held.close()
    app.pipeline.lock.release()


def _finished_once_written(held: contextlib.ExitStack, written: asyncio.Future[None]) -> None:
    """End a batch whose writes went on after the agent stopped."""
    if not written.cancelled():
        # Retrieved, so asyncio does not report it: the pipeline logged a store failure, and
        # whatever the write lacks, the changelog has for the next start.
        written.exception()
    _finished(held)


async def _stop_applying(exc: BaseException) -> NoReturn:
    """Apply nothing more and ack nothing: the batch that failed is read again after a restart."""
    if isinstance(exc, StoreRefused):
        # RocksDB refuses every write until reopened. The alarm is up; the partition
        # monitor stops the worker after SESSIONS_STALL_TIMEOUT, and a restart recovers
        # from the changelog.
        await asyncio.Event().wait()
    # A batch that failed half-way must never be followed by the next one: Faust would
    # restart this agent on the next fetch, and sessions would go on without the failed
    # batch's fragments. Stop the worker instead.
    logger.critical("A batch failed; stopping the worker: %r", exc, exc_info=exc)
    await app.crash(exc)
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


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
    #: The batch whose RocksDB writes are under way: the writes' future, the batch, its
    #: generation, and its hold on the collector (its objects live until the writes end).
    writing: tuple[asyncio.Future[None], ByPartition, int, contextlib.ExitStack] | None = None
    while True:
        upcoming = asyncio.ensure_future(batches.next())
        if writing is not None:
            written, previous, previous_generation, held = writing
            writing = None
            try:
                await asyncio.shield(written)
            except asyncio.CancelledError:
                # Stopping: the writes go on in their thread, and the lock stays held until
                # they are done, so no sweep reads the states from before them.
                upcoming.cancel()
                written.add_done_callback(functools.partial(_finished_once_written, held))
                raise
            except Exception as exc:
                _finished(held)
                upcoming.cancel()
                await _stop_applying(exc)
            _finished(held)
            # A rebalance while the batch was applied: leave it unacked. Its partitions
            # were seeked back to their committed offsets and read it again (skipped as
            # applied); an ack now would count offsets of partitions that moved or came back.
            if consumer.is_current(previous_generation):
                consumer.ack_records(previous)
        fetches = await upcoming
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
        if not batch:
            continue
        # Held until the batch's writes are done (above): no sweep comes in between.
        await pipeline.lock.acquire()
        held = contextlib.ExitStack()
        try:
            await expiry.resolve_interrupted_flushes(set(batch))
            # The batch's objects live until its writes are done: the collector would only
            # scan them again and again (engine/allocator.py).
            held.enter_context(collector_held_off())
            writing = (await pipeline.process(batch), batch, now, held)
        except asyncio.CancelledError:
            _finished(held)
            raise
        except Exception as exc:
            _finished(held)
            await _stop_applying(exc)
