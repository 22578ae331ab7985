"""The reassembly agent: drain the input channel in batches and hand them to the pipeline.

Faust's Stream costs tens of microseconds per event (processors, context,
sensors, one ack each), which capped the worker near 15k fragments/s. The
agent drains its channel's queue in batches instead and acks a batch only
once sessions_app.pipeline has delivered and persisted it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from sessions_app.app import app
from sessions_app.pipeline import buffers_lock, process_fragments
from sessions_app.topics import (
    alerts_topic,
    dead_letter_topic,
    expired_topic,
    fragments_topic,
    records_topic,
)

# A batch is what arrives within BATCH_WINDOW seconds of its first fragment, at most
# BATCH_MAX_FRAGMENTS: each batch costs two broker round trips, whatever its size.
BATCH_MAX_FRAGMENTS = 5000
BATCH_WINDOW = 0.01


@app.agent(fragments_topic)
async def reassemble_sessions(stream: Any) -> None:
    """Turn fragments into complete records, one batch at a time."""
    for topic in (records_topic, expired_topic, dead_letter_topic, alerts_topic):
        await topic.maybe_declare()
    channel = stream.channel.__aiter__()  # subscribes the channel with the conductor
    queue = channel.queue
    consumer = app.consumer
    flow_control = app.flow_control
    lock = buffers_lock()
    while True:
        try:
            events = [await queue.get()]
        except StopAsyncIteration:  # Faust ends the channel when the worker stops
            return
        if queue.qsize() < BATCH_MAX_FRAGMENTS:
            await asyncio.sleep(BATCH_WINDOW)
        while len(events) < BATCH_MAX_FRAGMENTS and not queue.empty():
            events.append(queue.get_nowait())
        # Rebalancing: wait, then drop what belongs to partitions no longer ours.
        await flow_control.acquire()
        assigned = consumer.assignment()
        events = [event for event in events if event.message.tp in assigned]
        if events:
            async with lock:
                await process_fragments(events)
        for event in events:
            event.message.ack(consumer)
