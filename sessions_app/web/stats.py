"""What `/sessions/` and `/metrics` report, read from the worker's state at request time."""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any

from sessions_app.stream.monitoring import process_rss_bytes


def readiness(app: Any) -> str | None:
    """Return why the worker cannot take traffic now, or None when it can."""
    failure = app.pipeline.store_failure
    if failure is not None:
        return f"the session store refuses writes: {failure.cause}"
    if app.rebalancing:
        return "a rebalance is under way"
    if not app.tables.recovery.completed.is_set():
        return "tables are being recovered"
    if not app.pipeline.active_partitions():
        return "no input partition is assigned to this worker"
    return None


def session_stats(app: Any) -> dict[str, Any]:
    """Return everything /sessions/ reports about the worker `app`."""
    pipeline = app.pipeline
    per_partition = pipeline.live_sessions()
    live = sum(per_partition.values())
    max_sessions = app.settings.max_sessions
    alarm = app.capacity.as_dict()
    alarm.pop("transitions")
    return {
        "worker": app.capacity.worker,
        "live_sessions": live,
        "live_sessions_by_partition": {str(p): n for p, n in per_partition.items()},
        "max_sessions": max_sessions,
        "usage": live / max_sessions,
        "alarm": alarm,
        "totals": app.totals.as_dict(),
        "largest_batch_fragments": pipeline.largest_batch,
        "process_rss_bytes": process_rss_bytes(),
        "rocksdb": pipeline.store.memory_usage(),
        "event_loop": app.loop_stalls.as_dict(asyncio.get_running_loop().time()),
        "partitions": pipeline.progress.as_dict(time.time()),
        "standbys": {str(p): v for p, v in app.tables.recovery.standby_progress().items()},
        "store": None
        if pipeline.store_failure is None
        else {"state": "refuses writes", **asdict(pipeline.store_failure)},
    }
