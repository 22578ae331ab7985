"""The input partitions watched: lag, progress, the stall alarm and the store alarm.

Every `Tuning.progress_period` seconds the monitor reads, for each input
partition the worker owns, the group's committed offset and the broker's end
offset, with a client of its own (what `kafka-consumer-groups` would show),
and feeds them with the pipeline's progress to the stall alarm
(sessions_app/core/progress.py). A partition with lag and no progress for
SESSIONS_STALL_TIMEOUT raises it: a WARNING, a JSON event on the alerts
topic, an entry in /alarms/. A store that refuses writes raises the store
alarm at once, turns /readyz to 503, and after SESSIONS_STALL_TIMEOUT stops
the worker with a non-zero exit, so an orchestrator restarts or replaces it:
RocksDB refuses every write until it is reopened, and the changelog holds
every change for the worker that recovers it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from mode import Service

from sessions_app.core.progress import StallAlarm, StallTransition
from sessions_app.settings import Settings
from sessions_app.stream.delivery import Delivery
from sessions_app.stream.pipeline import Pipeline, StoreRefused

logger = logging.getLogger(__name__)


class PartitionMonitor(Service):
    """Reads offsets, watches progress, raises the stall and store alarms."""

    def __init__(
        self,
        app: Any,
        settings: Settings,
        pipeline: Pipeline,
        delivery: Delivery,
        alerts_topic: Any,
        worker: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.app = app
        self.settings = settings
        self.pipeline = pipeline
        self.delivery = delivery
        self.alerts_topic = alerts_topic
        self.worker = worker
        self.stalls = StallAlarm(settings.stall_timeout)
        #: Store alarm transitions (raised only: a store that refused writes stays refused).
        self.store_history: deque[dict[str, object]] = deque(maxlen=100)
        self._client: AIOKafkaConsumer | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def on_stop(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.stop()

    @Service.task
    async def _watch(self) -> None:
        async for _ in self.itertimer(self.settings.tuning.progress_period, name="partitions"):
            await self.look()

    async def look(self) -> None:
        """Read offsets, update the alarms, and stop the worker if its store failed long ago."""
        progress = self.pipeline.progress
        now = time.time()
        owned = set(self.pipeline.active_partitions())
        progress.assigned(owned, now)
        try:
            await asyncio.wait_for(self._read_offsets(sorted(owned)), self._read_timeout)
        except Exception as exc:  # a broker that does not answer: judge by what is known
            logger.info("Could not read partition offsets: %r", exc)
        for transition in self.stalls.update(progress, time.time()):
            self._report_stall(transition)
        await self._watch_store()

    @property
    def _read_timeout(self) -> float:
        return max(self.settings.tuning.progress_period * 2, 5.0)

    async def _read_offsets(self, partitions: list[int]) -> None:
        if not partitions:
            return
        client = await self._connect()
        topic = self.settings.input_topic
        tps = [TopicPartition(topic, p) for p in partitions]
        ends = await client.end_offsets(tps)
        consumer = self.app.consumer
        for tp in tps:
            committed = await client.committed(tp)
            # The fetched high watermark where it is newer than the broker's answer.
            highwater = consumer.highwater(tp)
            end = max(ends.get(tp) or 0, highwater or 0)
            self.pipeline.progress.offsets(tp.partition, committed, end)

    async def _connect(self) -> AIOKafkaConsumer:
        if self._client is None:
            # The worker's group, never joined: committed() reads the group's offsets.
            client = AIOKafkaConsumer(
                group_id=self.settings.app_id,
                enable_auto_commit=False,
                **self.settings.kafka_client_options(),
            )
            try:
                await client.start()
            except BaseException:
                # Unreachable, or cancelled by the read's timeout: close what it opened, or
                # every look while the broker is away would leave a client behind.
                await asyncio.shield(client.stop())
                raise
            self._client = client
        return self._client

    def _report_stall(self, transition: StallTransition) -> None:
        if transition.state == "raised":
            logger.warning(
                "Partition %d stalled: lag %d, no progress for %.0f s (SESSIONS_STALL_TIMEOUT)",
                transition.partition,
                transition.lag,
                transition.time - transition.since,
            )
        else:
            logger.warning("Partition %d moves again: stall alarm cleared", transition.partition)
        self._publish(transition.as_event(self.worker))

    async def _watch_store(self) -> None:
        failure = self.pipeline.store_failure
        if failure is None:
            return
        if not self.store_history:
            event = {
                "alarm": "store",
                "worker": self.worker,
                "state": "raised",
                "cause": failure.cause,
                "since": failure.since,
                "time": time.time(),
            }
            self.store_history.append(event)
            logger.error(
                "Store alarm raised: the session store refuses writes (%s); the worker stops "
                "in %.0f s (SESSIONS_STALL_TIMEOUT)",
                failure.cause,
                self.settings.stall_timeout,
            )
            self._publish(event)
        if time.time() - failure.since >= self.settings.stall_timeout:
            logger.critical("Stopping: the session store refuses writes (%s)", failure.cause)
            await self.app.crash(StoreRefused(failure.cause))

    def _publish(self, event: dict[str, object]) -> None:
        """Send an alarm event without waiting: the broker may be what stalls."""
        task = asyncio.ensure_future(
            asyncio.wait_for(
                self.delivery.publish(
                    self.alerts_topic, self.worker.encode(), json.dumps(event).encode()
                ),
                60,
            )
        )
        self._sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.warning("An alarm event was not sent: %r", task.exception())

    def stalled_longest(self, now: float) -> tuple[int, float] | None:
        """Return the partition stalled the longest and for how long, None if none is."""
        if not self.stalls.stalled:
            return None
        partition, raised = min(self.stalls.stalled.items(), key=lambda item: item[1].since)
        return partition, now - raised.since

    def alarms(self) -> list[dict[str, object]]:
        """Return the active stall and store alarms, for /alarms/ and the dashboard."""
        active: list[dict[str, object]] = [
            {k: v for k, v in t.as_event(self.worker).items() if k != "state"}
            for t in self.stalls.stalled.values()
        ]
        failure = self.pipeline.store_failure
        if failure is not None:
            active.append({"alarm": "store", "cause": failure.cause, "since": failure.since})
        return active

    def transitions(self) -> list[dict[str, object]]:
        """Return the last stall and store transitions, oldest first."""
        stalls = [t.as_event(self.worker) for t in self.stalls.history]
        return sorted([*stalls, *self.store_history], key=lambda e: float(str(e["time"])))
