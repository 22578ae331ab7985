"""The worker watched: the capacity alarm wired to the alerts topic, and event-loop stalls."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from collections import deque
from typing import Any

from mode import Service

from sessions_app.core.capacity import AlarmTransition, CapacityAlarm
from sessions_app.settings import Settings

logger = logging.getLogger(__name__)


def process_rss_bytes() -> int:
    """Return this process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


class CapacityMonitor:
    """Watches the worker's live-session count against SESSIONS_MAX_SESSIONS.

    A transition of the alarm is logged as a WARNING and published as a JSON
    event on the alerts topic.
    """

    def __init__(self, settings: Settings, delivery: Any, alerts_topic: Any) -> None:
        self.alarm = CapacityAlarm(settings.max_sessions, settings.alarm_ratio)
        self.count = 0
        self.cap = settings.max_sessions
        self.worker = f"{socket.gethostname()}:{settings.web_port}"
        self._delivery = delivery
        self._alerts_topic = alerts_topic

    async def update(self, count: int) -> AlarmTransition | None:
        """Record the count; log and publish the alarm's transition if there is one."""
        self.count = count
        transition = self.alarm.update(count, time.time())
        if transition is None:
            return None
        if transition.state == "raised":
            logger.warning(
                "Session capacity alarm raised: %d live sessions, %.0f%% of the cap of %d",
                count,
                100 * count / self.cap,
                self.cap,
            )
        else:
            logger.warning(
                "Session capacity alarm cleared: %d live sessions, cap %d", count, self.cap
            )
        event = transition.as_event(self.worker)
        await self._delivery.publish(
            self._alerts_topic, self.worker.encode(), json.dumps(event).encode()
        )
        return transition

    def as_dict(self) -> dict[str, object]:
        """Return the alarm's state for the web view."""
        return {
            "state": "raised" if self.alarm.active else "ok",
            "since": self.alarm.since,
            "count": self.count,
            "cap": self.cap,
            "usage": self.count / self.cap,
            "alarm_ratio": self.alarm.ratio,
            "transitions": [t.as_event(self.worker) for t in self.alarm.history],
        }


class LoopStallMonitor(Service):
    """Measures how late the event loop wakes a sleeping task: the stall every task sees."""

    def __init__(self, period: float, window: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.period = period
        self.window = window
        self.max_ms = 0.0
        self.recent: deque[tuple[float, float]] = deque(maxlen=4096)
        #: Loop time of the last probe that woke up; None before the first.
        self.last_tick: float | None = None

    def record(self, stall_ms: float, now: float) -> None:
        """Record one stall of `stall_ms` seen at loop time `now`."""
        self.max_ms = max(self.max_ms, stall_ms)
        if stall_ms >= 1.0:
            self.recent.append((now, stall_ms))

    def turning(self, now: float, within: float) -> bool:
        """Tell whether the probe woke up within the last `within` seconds of loop time."""
        return self.last_tick is not None and now - self.last_tick <= within

    def as_dict(self, now: float) -> dict[str, float]:
        """Return the longest stall ever and over the last `window` seconds, in ms."""
        recent = [ms for at, ms in self.recent if now - at <= self.window]
        return {
            "max_stall_ms": round(self.max_ms, 1),
            "max_stall_ms_last_10s": round(max(recent, default=0.0), 1),
        }

    @Service.task
    async def _probe(self) -> None:
        """Sleep `period` seconds again and again; record how much longer each sleep took."""
        loop = asyncio.get_running_loop()
        while not self.should_stop:
            start = loop.time()
            await asyncio.sleep(self.period)
            now = loop.time()
            self.last_tick = now
            self.record((now - start - self.period) * 1000, now)
