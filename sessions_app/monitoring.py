"""The capacity alarm, wired: a WARNING log line and a JSON event on the alerts topic."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass

from sessions_app.app import app, settings
from sessions_app.capacity import AlarmTransition, CapacityAlarm

logger = logging.getLogger(__name__)


class CapacityMonitor:
    """Watches the worker's live-session count against SESSIONS_MAX_SESSIONS."""

    def __init__(self) -> None:
        self.alarm = CapacityAlarm(settings.max_sessions, settings.alarm_ratio)
        self.count = 0

    @property
    def worker(self) -> str:
        return f"{socket.gethostname()}:{app.conf.web_port}"

    async def update(self, count: int) -> AlarmTransition | None:
        """Record the count; log and publish the alarm's transition if there is one."""
        self.count = count
        transition = self.alarm.update(count, time.time())
        if transition is None:
            return None
        event = transition.as_event(self.worker)
        if transition.state == "raised":
            logger.warning(
                "Session capacity alarm raised: %d live sessions, %.0f%% of the cap of %d",
                count,
                100 * count / settings.max_sessions,
                settings.max_sessions,
            )
        else:
            logger.warning(
                "Session capacity alarm cleared: %d live sessions, cap %d",
                count,
                settings.max_sessions,
            )
        await app.producer.send_and_wait(
            settings.alerts_topic,
            self.worker.encode(),
            json.dumps(event).encode(),
            None,
            None,
            None,
        )
        return transition

    def as_dict(self) -> dict[str, object]:
        """Return the alarm's state for the web view."""
        return {
            "state": "raised" if self.alarm.active else "ok",
            "since": self.alarm.since,
            "count": self.count,
            "cap": settings.max_sessions,
            "usage": self.count / settings.max_sessions,
            "alarm_ratio": settings.alarm_ratio,
            "transitions": [t.as_event(self.worker) for t in self.alarm.history],
        }


capacity = CapacityMonitor()


class LoopStallMonitor:
    """Measures how late the event loop wakes a sleeping task: the stall every task sees."""

    PERIOD = 0.02
    WINDOW = 10.0

    def __init__(self) -> None:
        self.max_ms = 0.0
        self.recent: deque[tuple[float, float]] = deque(maxlen=4096)

    def record(self, stall_ms: float, now: float) -> None:
        self.max_ms = max(self.max_ms, stall_ms)
        if stall_ms >= 1.0:
            self.recent.append((now, stall_ms))

    def as_dict(self, now: float) -> dict[str, float]:
        """Return the longest stall ever and over the last WINDOW seconds, in ms."""
        window = [ms for at, ms in self.recent if now - at <= self.WINDOW]
        return {
            "max_stall_ms": round(self.max_ms, 1),
            "max_stall_ms_last_10s": round(max(window, default=0.0), 1),
        }


loop_stalls = LoopStallMonitor()


@app.task  # type: ignore[untyped-decorator]
async def watch_event_loop() -> None:
    """Sleep PERIOD seconds again and again; record how much longer each sleep took."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(LoopStallMonitor.PERIOD)
        now = loop.time()
        loop_stalls.record((now - start - LoopStallMonitor.PERIOD) * 1000, now)


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the dashboard's history."""

    time: float
    live_sessions: int
    max_sessions: int
    rss_bytes: int
    heap_bytes: int | None


history: deque[Sample] = deque(maxlen=360)  # an hour at one sample per HISTORY_PERIOD
HISTORY_PERIOD = 10.0
