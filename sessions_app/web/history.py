"""The dashboard's history: a sample of sessions, RSS and heap every period, for an hour."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mode import Service

from sessions_app.stream.monitoring import process_rss_bytes


@dataclass(frozen=True, slots=True)
class Sample:
    """One point of the dashboard's history."""

    time: float
    live_sessions: int
    max_sessions: int
    rss_bytes: int
    heap_bytes: int | None
    #: Input records after the committed offsets, and fragments/s, over the owned partitions.
    lag: int | None
    fragments_per_second: float


class HistorySampler(Service):
    """Takes a Sample every `period` seconds and keeps the last `size` of them."""

    def __init__(
        self,
        period: float,
        size: int,
        max_sessions: int,
        live_sessions: Callable[[], int],
        heap_bytes: Callable[[], int | None],
        input_flow: Callable[[], tuple[int | None, float]],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.period = period
        self.samples: deque[Sample] = deque(maxlen=size)
        self._max_sessions = max_sessions
        self._live_sessions = live_sessions
        self._heap_bytes = heap_bytes
        self._input_flow = input_flow

    def sample(self) -> Sample:
        """Add a point to the history and return it."""
        lag, rate = self._input_flow()
        point = Sample(
            time.time(),
            self._live_sessions(),
            self._max_sessions,
            process_rss_bytes(),
            self._heap_bytes(),
            lag,
            rate,
        )
        self.samples.append(point)
        return point

    @Service.task
    async def _sample_periodically(self) -> None:
        async for _ in self.itertimer(self.period, name="sample_history"):
            self.sample()
