"""Kafka's record size limits, against the largest records the worker can write: pure.

Apache Kafka refuses a record batch larger than the topic's
`max.message.bytes` (by default the broker's `message.max.bytes`,
1,048,588 bytes). The worker writes records no larger than these, the batch
core (sessions_app/core/batch.py) keeping every record, remnant and stored
buffer within SESSIONS_MAX_BUFFER_BYTES:

    output, expired   key + record or remnant (<= cap)          + headers
    changelog         b"s" + key + state header + pending (<= P)
                      b"x" + key + marker header + pending (<= P)

where P is the cap, or the delimiter's length less one if that is more
(bytes that may begin a delimiter stay pending). A record batch of one
record adds at most RECORD_OVERHEAD bytes (a 61-byte batch header, the
record's varints and the `seq` and `reason` headers). The worker checks at
start that the largest of each fits its topic, and that its producer
batches do, so Kafka never refuses what it sends.
"""

from __future__ import annotations

from sessions_app.core.keys import MAX_SESSION_ID_BYTES
from sessions_app.core.session_state import HEADER_SIZE

#: Kafka's `message.max.bytes` default, which a topic's `max.message.bytes` inherits.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1_048_588
#: A batch header (61 bytes), a record's varints and our headers, rounded up.
RECORD_OVERHEAD = 256


def largest_records(cap: int, delimiter: bytes) -> dict[str, int]:
    """Return the largest record batch, in bytes, the worker writes to each kind of topic."""
    pending = max(cap, len(delimiter) - 1)
    return {
        "output": MAX_SESSION_ID_BYTES + cap + RECORD_OVERHEAD,
        "expired": MAX_SESSION_ID_BYTES + pending + RECORD_OVERHEAD,
        "changelog": 1 + MAX_SESSION_ID_BYTES + HEADER_SIZE + pending + RECORD_OVERHEAD,
    }


def size_problem(
    cap: int, delimiter: bytes, batch_size: int, limits: dict[str, tuple[str, int]]
) -> tuple[str, str] | None:
    """Return (variable, why) if records or batches would exceed a topic's limit, else None.

    `limits` maps "output", "expired" and "changelog" to (topic name, max.message.bytes).
    """
    largest = largest_records(cap, delimiter)
    for kind in ("changelog", "output", "expired"):
        topic, limit = limits[kind]
        if largest[kind] > limit:
            fitting = cap - (largest[kind] - limit)
            remedy = (
                f"lower the cap to {fitting:,} or raise the topic's max.message.bytes"
                if fitting >= 1 and largest_records(fitting, delimiter)[kind] <= limit
                else "raise the topic's max.message.bytes: no cap fits it"
            )
            return (
                "SESSIONS_MAX_BUFFER_BYTES",
                f"the worker's {kind} records reach {largest[kind]:,} bytes with a "
                f"{MAX_SESSION_ID_BYTES:,}-byte session ID, but {topic} takes at most "
                f"{limit:,} (max.message.bytes): {remedy}",
            )
    topic, smallest = min(limits.values(), key=lambda named: named[1])
    if batch_size > smallest:
        return (
            "SESSIONS_PRODUCER_MAX_BATCH_SIZE",
            f"producer batches of {batch_size:,} bytes exceed what {topic} takes, "
            f"{smallest:,} bytes (max.message.bytes)",
        )
    return None
