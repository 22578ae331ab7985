"""The worker's web views, on Faust's own web server: read-only JSON, Prometheus text, a dashboard.

GET /sessions/   live sessions (total, per partition), cap, alarm, totals, memory
GET /heap/       heapy statistics (?format=text, ?diff=baseline, ?top=N); token if set
GET /alarms/     active alarms and the last 100 transitions
GET /history/    the dashboard's samples of the last hour
GET /metrics     Prometheus text format; token if set
GET /            the dashboard page
"""

from __future__ import annotations

import asyncio
import hmac
import resource
import time
from dataclasses import asdict
from importlib import resources
from typing import Any

from faust import web
from faust.web.drivers import aiohttp as faust_aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from sessions_app.app import app, settings
from sessions_app.counters import totals
from sessions_app.heapstats import TOP_ROWS, HeapSnapshots, diff
from sessions_app.monitoring import HISTORY_PERIOD, Sample, capacity, history, loop_stalls
from sessions_app.pipeline import live_sessions, store
from sessions_app.store import current_budget

# Faust serves a {"status": "OK"} page at "/" unless its stats are on; the dashboard takes "/".
faust_aiohttp.Web.production_blueprints = []

blueprint = web.Blueprint("sessions")
heap_snapshots = HeapSnapshots(settings.heap_min_interval)


class BadRequest(ValueError):
    """A query parameter the view does not accept."""


def process_rss_bytes() -> int:
    """Return this process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def rocksdb_memory() -> dict[str, int] | None:
    """Return the shared budget's usage and the table readers' memory of every open instance."""
    budget = current_budget()
    if budget is None:
        return None
    usage = budget.usage()
    readers = 0
    for db in list(store()._dbs.values()):  # the open instances, standbys included
        readers += int(db.property_int_value("rocksdb.estimate-table-readers-mem") or 0)
    usage["table_readers_bytes"] = readers
    return usage


def session_stats() -> dict[str, Any]:
    """Return everything /sessions/ reports."""
    per_partition = live_sessions()
    live = sum(per_partition.values())
    alarm = capacity.as_dict()
    alarm.pop("transitions")
    return {
        "worker": capacity.worker,
        "live_sessions": live,
        "live_sessions_by_partition": {str(p): n for p, n in per_partition.items()},
        "max_sessions": settings.max_sessions,
        "usage": live / settings.max_sessions,
        "alarm": alarm,
        "totals": totals.as_dict(),
        "process_rss_bytes": process_rss_bytes(),
        "rocksdb": rocksdb_memory(),
        "event_loop": loop_stalls.as_dict(asyncio.get_running_loop().time()),
    }


def authorized(request: web.Request) -> bool:
    """Tell whether the request may read a protected view (always, without a token)."""
    if settings.web_token is None:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {settings.web_token}".encode())


def query_choice(request: web.Request, name: str, choices: tuple[str, ...]) -> str | None:
    """Return query parameter `name`, or raise BadRequest if it is not one of `choices`."""
    value = request.query.get(name)
    if value is not None and value not in choices:
        raise BadRequest(f"{name}={value!r} is not allowed; use one of: {', '.join(choices)}")
    return value


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """Return integer query parameter `name`, or raise BadRequest if it is not one in range."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"{name}={raw!r} is not a whole number") from None
    if not low <= value <= high:
        raise BadRequest(f"{name}={value} is outside {low}..{high}")
    return value


class ReadOnlyView(web.View):
    """A view that answers GET (and HEAD) only; unknown query parameters get 400."""

    allowed_params: frozenset[str] = frozenset()

    def unknown_params(self, request: web.Request) -> web.Response | None:
        unknown = sorted(set(request.query) - self.allowed_params)
        if unknown:
            return self.error(400, f"unknown query parameter(s): {', '.join(unknown)}")
        return None


@blueprint.route("/sessions/", name="sessions")
class SessionsView(ReadOnlyView):
    """Live sessions against the cap, the alarm, totals, and memory."""

    async def get(self, request: web.Request) -> web.Response:
        return self.unknown_params(request) or self.json(session_stats())


@blueprint.route("/alarms/", name="alarms")
class AlarmsView(ReadOnlyView):
    """Active alarms and the last 100 transitions."""

    async def get(self, request: web.Request) -> web.Response:
        if bad := self.unknown_params(request):
            return bad
        state = capacity.as_dict()
        active = (
            []
            if state["state"] != "raised"
            else [
                {
                    "alarm": "session-capacity",
                    "since": state["since"],
                    "count": state["count"],
                    "cap": state["cap"],
                    "usage": state["usage"],
                }
            ]
        )
        return self.json({"active": active, "transitions": state["transitions"]})


@blueprint.route("/history/", name="history")
class HistoryView(ReadOnlyView):
    """The last hour of samples: live sessions, cap, RSS, Python heap."""

    async def get(self, request: web.Request) -> web.Response:
        if bad := self.unknown_params(request):
            return bad
        return self.json(
            {
                "period_seconds": HISTORY_PERIOD,
                "alarm_ratio": settings.alarm_ratio,
                "samples": [asdict(s) for s in history],
            }
        )


@blueprint.route("/heap/", name="heap")
class HeapView(ReadOnlyView):
    """guppy3 heapy statistics of the worker's Python heap."""

    allowed_params = frozenset({"format", "diff", "top"})

    async def get(self, request: web.Request) -> web.Response:
        if not authorized(request):
            return self.error(401, "a bearer token is required (SESSIONS_WEB_TOKEN)")
        if bad := self.unknown_params(request):
            return bad
        try:
            fmt = query_choice(request, "format", ("json", "text")) or "json"
            against = query_choice(request, "diff", ("baseline",))
            top = query_int(request, "top", 20, 1, TOP_ROWS)
        except BadRequest as exc:
            return self.error(400, str(exc))
        snapshot = await heap_snapshots.get()
        if fmt == "text":
            return self.text(snapshot["text"])
        body: dict[str, Any] = {
            "taken_at": snapshot["taken_at"],
            "took_seconds": snapshot["took_seconds"],
            "min_interval_seconds": settings.heap_min_interval,
            "total_size": snapshot["total_size"],
            "count": snapshot["count"],
            "rows": snapshot["rows"][:top],
        }
        if against == "baseline":
            baseline = heap_snapshots.baseline or snapshot
            body["baseline_taken_at"] = baseline["taken_at"]
            body["grown"] = diff(baseline, snapshot)[:top]
        return self.json(body)


class SessionsCollector:
    """Prometheus metrics read from the worker's state at scrape time."""

    def collect(self) -> Any:
        stats = session_stats()
        live = GaugeMetricFamily(
            "sessions_live", "Live sessions held by this worker", labels=["partition"]
        )
        for partition, count in stats["live_sessions_by_partition"].items():
            live.add_metric([partition], count)
        yield live
        yield GaugeMetricFamily(
            "sessions_max", "SESSIONS_MAX_SESSIONS", value=settings.max_sessions
        )
        yield GaugeMetricFamily("sessions_usage_ratio", "Live sessions / cap", value=stats["usage"])
        yield GaugeMetricFamily(
            "sessions_capacity_alarm",
            "1 while the capacity alarm is raised",
            value=1 if stats["alarm"]["state"] == "raised" else 0,
        )
        for name, value in stats["totals"].items():
            yield CounterMetricFamily(
                f"sessions_{name.removeprefix('sessions_')}",
                f"Total {name.replace('_', ' ')}",
                value=value,
            )
        yield GaugeMetricFamily(
            "sessions_process_rss_bytes", "Resident set size", value=stats["process_rss_bytes"]
        )
        for name, value in (stats["rocksdb"] or {}).items():
            yield GaugeMetricFamily(f"sessions_rocksdb_{name}", f"RocksDB {name}", value=value)
        yield GaugeMetricFamily(
            "sessions_event_loop_max_stall_ms",
            "Longest event-loop stall",
            value=stats["event_loop"]["max_stall_ms"],
        )
        if heap_snapshots.last is not None:
            yield GaugeMetricFamily(
                "sessions_python_heap_bytes",
                "Python heap size at the last heapy snapshot",
                value=heap_snapshots.last["total_size"],
            )


registry = CollectorRegistry(auto_describe=False)
registry.register(SessionsCollector())


@blueprint.route("/metrics", name="metrics")
class MetricsView(ReadOnlyView):
    """Prometheus text exposition of every counter and gauge."""

    async def get(self, request: web.Request) -> web.Response:
        if not authorized(request):
            return self.error(401, "a bearer token is required (SESSIONS_WEB_TOKEN)")
        if bad := self.unknown_params(request):
            return bad
        return self.bytes(
            generate_latest(registry),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


def _static(name: str) -> bytes:
    return resources.files("sessions_app").joinpath("static", name).read_bytes()


@blueprint.route("/", name="dashboard")
class DashboardView(ReadOnlyView):
    """The dashboard page for a person."""

    async def get(self, request: web.Request) -> web.Response:
        return self.text(_static("dashboard.html").decode(), content_type="text/html")


@blueprint.route("/static/chart.umd.min.js", name="chartjs")
class ChartLibraryView(ReadOnlyView):
    """Chart.js, shipped with the package."""

    async def get(self, request: web.Request) -> web.Response:
        return self.bytes(_static("chart.umd.min.js"), content_type="text/javascript")


@app.timer(interval=HISTORY_PERIOD)  # type: ignore[untyped-decorator]
async def sample_history() -> None:
    """Add a point to the dashboard's hour of history."""
    heap = heap_snapshots.last
    history.append(
        Sample(
            time.time(),
            sum(live_sessions().values()),
            settings.max_sessions,
            process_rss_bytes(),
            None if heap is None else heap["total_size"],
        )
    )


blueprint.register(app, url_prefix="")
