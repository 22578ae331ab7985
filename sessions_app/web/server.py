"""Faust's aiohttp web server, serving sessions-app's views at "/" instead of Faust's index."""

from __future__ import annotations

from typing import Any, ClassVar

from faust.web.drivers.aiohttp import Web

#: Loaded by name when the server starts, so no module imports the views.
VIEWS = "sessions_app.web.views:blueprint"


class SessionsWeb(Web):
    """The web server with the sessions blueprint; Faust's production index would take "/"."""

    production_blueprints: ClassVar[list[tuple[str, Any]]] = []

    def _enabled_blueprints(self) -> list[tuple[str, Any]]:
        return [*super()._enabled_blueprints(), ("", VIEWS)]
