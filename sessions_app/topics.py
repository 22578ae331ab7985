"""The topics sessions-app reads and writes, all with the input's partition count."""

from __future__ import annotations

from sessions_app.app import app, settings


def _topic(name: str, *, internal: bool = False):  # type: ignore[no-untyped-def]
    return app.topic(
        name,
        key_serializer="raw",
        value_serializer="raw",
        partitions=settings.partitions,
        # internal: Faust creates it with this partition count before subscribing.
        internal=internal,
    )


fragments_topic = _topic(settings.input_topic, internal=True)
records_topic = _topic(settings.output_topic)
expired_topic = _topic(settings.expired_topic)
dead_letter_topic = _topic(settings.dlq_topic)
alerts_topic = _topic(settings.alerts_topic)
