"""The worker's web views, on Faust's own web server: read-only JSON, Prometheus text, a dashboard.

GET /sessions/   live sessions (total, per partition), cap, alarm, totals, memory
GET /heap/       heapy statistics (?format=text, ?diff=baseline, ?top=N); token if set
GET /alarms/     active alarms (capacity, stalled partitions, store) and the last 100 transitions
GET /history/    the dashboard's samples of the last hour
GET /metrics     Prometheus text format; token if set
GET /sessions/lookup?key=K (or key_hex=H)   one session: partition, sizes; token if set
GET /census/     live sessions by pending bytes and idle age, the largest and idlest; token
GET /livez       200 while the event loop turns, 503 otherwise (for an orchestrator's probe)
GET /readyz      200 when partitions are assigned and recovered, 503 with the reason otherwise
GET /            the dashboard page

The blueprint is loaded by name when the web server starts (sessions_app.web.server).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import asdict
from importlib import resources
from typing import Any

from faust import web

from sessions_app.stream.topics import partition_for
from sessions_app.web.heapstats import TOP_ROWS, diff
from sessions_app.web.metrics import exposition
from sessions_app.web.stats import readiness, session_stats

blueprint = web.Blueprint("sessions")


class BadRequest(ValueError):
    """A query parameter the view does not accept."""


def authorized(request: web.Request, token: str | None) -> bool:
    """Tell whether the request may read a protected view (always, without a token)."""
    if token is None:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


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
    """A view that answers GET (and HEAD) only; unknown query parameters get 400.

    `self.app` is the SessionsApp: every view reads the worker's state through it.
    """

    app: Any
    allowed_params: frozenset[str] = frozenset()

    def unknown_params(self, request: web.Request) -> web.Response | None:
        unknown = sorted(set(request.query) - self.allowed_params)
        if unknown:
            return self.error(400, f"unknown query parameter(s): {', '.join(unknown)}")
        return None

    def unauthorized(self, request: web.Request) -> web.Response | None:
        if authorized(request, self.app.settings.web_token):
            return None
        return self.error(401, "a bearer token is required (SESSIONS_WEB_TOKEN)")


@blueprint.route("/sessions/", name="sessions")
class SessionsView(ReadOnlyView):
    """Live sessions against the cap, the alarm, totals, and memory."""

    async def get(self, request: web.Request) -> web.Response:
        return self.unknown_params(request) or self.json(session_stats(self.app))


@blueprint.route("/sessions/lookup", name="lookup")
class LookupView(ReadOnlyView):
    """One session, looked up by its ID: where it lives and its sizes, never its bytes."""

    allowed_params = frozenset({"key", "key_hex"})

    async def get(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        if bad := self.unknown_params(request):
            return bad
        given = [name for name in ("key", "key_hex") if name in request.query]
        if len(given) != 1:
            return self.error(400, "give the session ID as key= or, for binary IDs, key_hex=")
        if given == ["key"]:
            session_id = request.query["key"].encode("utf-8", "surrogateescape")
        else:
            try:
                session_id = bytes.fromhex(request.query["key_hex"])
            except ValueError:
                return self.error(400, f"key_hex={request.query['key_hex']!r} is not hex")
        if not session_id:
            return self.error(400, "the session ID is empty")
        pipeline = self.app.pipeline
        partition = partition_for(session_id, self.app.settings.partitions)
        store = pipeline.store.partition(partition)
        if partition not in pipeline.active_partitions() or store is None:
            return self.json(
                {
                    "error": f"partition {partition} is not on this worker: "
                    "ask the worker that owns it",
                    "partition": partition,
                    "owner": False,
                },
                status=404,
            )
        state = store.session(session_id)
        if state is None:
            return self.json(
                {
                    "error": f"no live session with this ID on partition {partition}",
                    "partition": partition,
                    "owner": True,
                },
                status=404,
            )
        return self.json(
            {
                "partition": partition,
                "owner": True,
                "pending_bytes": state.pending_size,
                "next_seq": state.next_seq,
                "seconds_idle": round(max(time.time() - state.last_seen_us / 1e6, 0.0), 3),
                "applied_offset": state.applied_offset,
            }
        )


@blueprint.route("/census/", name="census")
class CensusView(ReadOnlyView):
    """Live sessions by pending bytes and by idle age, and the largest and idlest of them."""

    async def get(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        if bad := self.unknown_params(request):
            return bad
        return self.json(await self.app.census.get())


@blueprint.route("/livez", name="livez")
class LivenessView(ReadOnlyView):
    """200 while the event loop turns and no partition has been stalled for long."""

    async def get(self, request: web.Request) -> web.Response:
        if bad := self.unknown_params(request):
            return bad
        app = self.app
        now = asyncio.get_running_loop().time()
        if not app.loop_stalls.turning(now, app.settings.tuning.liveness_timeout):
            return self.json({"status": "stalled", "reason": "the event loop"}, status=503)
        # A consumer that stopped fetching with no error does not come back by itself: after
        # twice SESSIONS_STALL_TIMEOUT, let the orchestrator restart the worker.
        longest = app.partition_monitor.stalled_longest(time.time())
        if longest is not None and longest[1] >= 2 * app.settings.stall_timeout:
            partition, seconds = longest
            reason = f"partition {partition} has lag and made no progress for {seconds:.0f} s"
            return self.json({"status": "stalled", "reason": reason}, status=503)
        return self.json({"status": "ok"})


@blueprint.route("/readyz", name="readyz")
class ReadinessView(ReadOnlyView):
    """200 when the worker has partitions, recovered, and no rebalance is under way."""

    async def get(self, request: web.Request) -> web.Response:
        if bad := self.unknown_params(request):
            return bad
        reason = readiness(self.app)
        if reason is None:
            return self.json({"status": "ready"})
        return self.json({"status": "not ready", "reason": reason}, status=503)


@blueprint.route("/alarms/", name="alarms")
class AlarmsView(ReadOnlyView):
    """Active alarms and the last 100 transitions."""

    async def get(self, request: web.Request) -> web.Response:
        if bad := self.unknown_params(request):
            return bad
        state = self.app.capacity.as_dict()
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
        monitor = self.app.partition_monitor
        transitions = sorted(
            [*state["transitions"], *monitor.transitions()], key=lambda e: float(e["time"])
        )[-100:]
        return self.json({"active": active + monitor.alarms(), "transitions": transitions})


@blueprint.route("/history/", name="history")
class HistoryView(ReadOnlyView):
    """The last hour of samples: live sessions, cap, RSS, Python heap."""

    async def get(self, request: web.Request) -> web.Response:
        if bad := self.unknown_params(request):
            return bad
        history = self.app.history
        return self.json(
            {
                "period_seconds": history.period,
                "alarm_ratio": self.app.settings.alarm_ratio,
                "samples": [asdict(s) for s in history.samples],
            }
        )


@blueprint.route("/heap/", name="heap")
class HeapView(ReadOnlyView):
    """guppy3 heapy statistics of the worker's Python heap."""

    allowed_params = frozenset({"format", "diff", "top"})

    async def get(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        if bad := self.unknown_params(request):
            return bad
        try:
            fmt = query_choice(request, "format", ("json", "text")) or "json"
            against = query_choice(request, "diff", ("baseline",))
            top = query_int(request, "top", 20, 1, TOP_ROWS)
        except BadRequest as exc:
            return self.error(400, str(exc))
        snapshots = self.app.heap_snapshots
        snapshot = await snapshots.get()
        if fmt == "text":
            return self.text(snapshot["text"])
        body: dict[str, Any] = {
            "taken_at": snapshot["taken_at"],
            "took_seconds": snapshot["took_seconds"],
            "min_interval_seconds": snapshots.min_interval,
            "total_size": snapshot["total_size"],
            "count": snapshot["count"],
            "rows": snapshot["rows"][:top],
        }
        if against == "baseline":
            baseline = snapshots.baseline or snapshot
            body["baseline_taken_at"] = baseline["taken_at"]
            body["grown"] = diff(baseline, snapshot)[:top]
        return self.json(body)


@blueprint.route("/metrics", name="metrics")
class MetricsView(ReadOnlyView):
    """Prometheus text exposition of every counter and gauge."""

    async def get(self, request: web.Request) -> web.Response:
        if denied := self.unauthorized(request):
            return denied
        if bad := self.unknown_params(request):
            return bad
        return self.bytes(
            exposition(self.app),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )


def _static(name: str) -> bytes:
    return resources.files("sessions_app.web").joinpath("static", name).read_bytes()


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
