"""The topics sessions-app reads and writes, all with the input's partition count.

A session's fragments and its buffer must live on the same partition number
of the input topic and of the table's changelog, and its records go to that
partition of the output and expired topics. Faust assigns co-partitioned
topics together only when their partition counts agree: an input of 8 and a
changelog of 12 would be assigned independently and send a session's
fragments to one worker and its buffer to another, silently. So a worker
reads the partition counts of the topics that exist before it consumes, and
refuses to start on a mismatch (`copartitioning_problem`).
"""

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


def copartitioning_problem(
    settings: Settings, changelog: str, counts: dict[str, int | None]
) -> str | None:
    """Return why these partition counts break co-partitioning, or None if they do not.

    `counts` maps topic names to their partition counts on the broker, None for a
    topic that does not exist yet (the worker creates it with SESSIONS_PARTITIONS).
    """
    expected = settings.partitions
    found = {name: count for name, count in counts.items() if count is not None}
    problems = []
    input_count = found.get(settings.input_topic)
    if input_count is not None and input_count != expected:
        problems.append(f"{settings.input_topic} has {input_count} partitions")
    changelog_count = found.get(changelog)
    if changelog_count is not None and changelog_count != (input_count or expected):
        problems.append(f"{changelog} has {changelog_count} partitions")
    # Records go to the input's partition number: these need at least as many.
    for name in (settings.output_topic, settings.expired_topic):
        count = found.get(name)
        if count is not None and count < (input_count or expected):
            problems.append(f"{name} has {count} partitions")
    if not problems:
        return None
    return (
        f"topics are not co-partitioned with SESSIONS_PARTITIONS={expected}: "
        + ", ".join(problems)
        + "; the input and the changelog need exactly that many, the output and"
        " expired topics at least that many (README, Scaling out: repartitioning)"
    )


def partition_for(session_id: bytes, partitions: int) -> int:
    """Return the input partition Kafka's default partitioner gives a session ID."""
    from aiokafka.partitioner import murmur2

    return int(murmur2(session_id) & 0x7FFFFFFF) % partitions


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
