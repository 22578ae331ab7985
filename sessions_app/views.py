"""HTTP views on Faust's web server: read-only JSON about the worker's sessions."""

from __future__ import annotations

import asyncio
import resource
from typing import Any

from faust import web

from sessions_app.app import app, settings
from sessions_app.counters import totals
from sessions_app.monitoring import capacity, loop_stalls
from sessions_app.pipeline import live_sessions
from sessions_app.store import current_budget

blueprint = web.Blueprint("sessions")


def process_rss_bytes() -> int:
    """Return this process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


@blueprint.route("/", name="sessions")
class SessionsView(web.View):
    """Live sessions against the cap, the alarm, totals, and memory."""

    async def get(self, request: web.Request) -> web.Response:
        per_partition = live_sessions()
        live = sum(per_partition.values())
        budget = current_budget()
        body: dict[str, Any] = {
            "worker": capacity.worker,
            "live_sessions": live,
            "live_sessions_by_partition": {str(p): n for p, n in per_partition.items()},
            "max_sessions": settings.max_sessions,
            "usage": live / settings.max_sessions,
            "alarm": {k: v for k, v in capacity.as_dict().items() if k != "transitions"},
            "totals": totals.as_dict(),
            "process_rss_bytes": process_rss_bytes(),
            "rocksdb": budget.usage() if budget else None,
            "event_loop": loop_stalls.as_dict(asyncio.get_running_loop().time()),
        }
        return self.json(body)


blueprint.register(app, url_prefix="/sessions")
