"""The census of the sessions in RocksDB, taken in bounded steps so the stream keeps flowing.

A census walks every session of the worker's active partitions: at millions
of sessions that is seconds of work, so it yields the event loop every TURN
seconds (looking at the clock every `Tuning.census_step` sessions), and a
census is reused for `Tuning.census_min_interval` seconds. It keeps counters and the
few largest and longest idle sessions (sessions_app/core/census.py), never
an object per session.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sessions_app.core.census import Census, idle_bounds, pending_bounds
from sessions_app.settings import Settings

#: The longest the census holds the event loop between two turns of it.
TURN = 0.01


class SessionCensus:
    """The last census of the worker's sessions, and the taking of the next one."""

    def __init__(self, pipeline: Any, settings: Settings) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.last: dict[str, Any] | None = None
        self._taking = asyncio.Lock()

    def fresh(self) -> bool:
        """Tell whether the last census is young enough to be reused."""
        interval = self.settings.tuning.census_min_interval
        return self.last is not None and time.time() - self.last["taken_at"] < interval

    async def get(self) -> dict[str, Any]:
        """Return a census no older than the minimum interval, taking one if needed."""
        async with self._taking:
            if not self.fresh():
                self.last = await self._take()
            assert self.last is not None
            return self.last

    async def _take(self) -> dict[str, Any]:
        settings, step = self.settings, self.settings.tuning.census_step
        started = time.monotonic()
        census = Census(
            pending_bounds(settings.max_buffer_bytes),
            idle_bounds(settings.idle_timeout),
            int(time.time() * 1_000_000),
        )
        partitions = self.pipeline.active_partitions()
        turn = time.monotonic()
        for partition in partitions:
            store = self.pipeline.store.partition(partition)
            if store is None:
                continue
            for counted, (session_id, pending, last_seen) in enumerate(store.sessions(), 1):
                census.add(session_id, pending, last_seen)
                # Let the stream run at least every TURN seconds.
                if counted % step == 0 and time.monotonic() - turn >= TURN:
                    await asyncio.sleep(0)
                    turn = time.monotonic()
                    if self.pipeline.store.partition(partition) is None:
                        break  # revoked meanwhile: its sessions are another worker's now
        return {
            "taken_at": time.time(),
            "took_seconds": round(time.monotonic() - started, 3),
            "min_interval_seconds": settings.tuning.census_min_interval,
            "partitions": partitions,
            **census.as_dict(),
        }
