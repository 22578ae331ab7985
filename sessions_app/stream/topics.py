"""The topics sessions-app reads and writes, all with the input's partition count."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sessions_app.settings import Settings


@dataclass(frozen=True)
class SessionTopics:
    """The worker's topics as Faust Topic objects, raw bytes in and out."""

    fragments: Any
    records: Any
    expired: Any
    dead_letters: Any
    alerts: Any

    def outputs(self) -> tuple[Any, ...]:
        """Return the topics the worker writes."""
        return (self.records, self.expired, self.dead_letters, self.alerts)


def declare_topics(app: Any, settings: Settings) -> SessionTopics:
    """Declare the worker's topics on `app`."""

    def topic(name: str, *, internal: bool = False) -> Any:
        return app.topic(
            name,
            key_serializer="raw",
            value_serializer="raw",
            partitions=settings.partitions,
            # internal: Faust creates it with this partition count before subscribing.
            internal=internal,
        )

    return SessionTopics(
        fragments=topic(settings.input_topic, internal=True),
        records=topic(settings.output_topic),
        expired=topic(settings.expired_topic),
        dead_letters=topic(settings.dlq_topic),
        alerts=topic(settings.alerts_topic),
    )
