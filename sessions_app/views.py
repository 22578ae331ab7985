"""HTTP views on Faust's web server: read-only JSON about the worker's sessions."""

from __future__ import annotations

from typing import Any

from faust import web

from sessions_app.app import app, settings
from sessions_app.counters import totals

blueprint = web.Blueprint("sessions")


@blueprint.route("/", name="sessions")
class SessionsView(web.View):
    """Totals of what this worker consumed, emitted, closed and dead-lettered."""

    async def get(self, request: web.Request) -> web.Response:
        body: dict[str, Any] = {
            "worker": f"{settings.web_host}:{app.conf.web_port}",
            "totals": totals.as_dict(),
        }
        return self.json(body)


blueprint.register(app, url_prefix="/sessions")
