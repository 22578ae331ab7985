"""A census of the sessions off the heap: what heapy's partition by kind is for the heap.

Pure: it is fed one (session ID, pending bytes, last seen) at a time and
keeps only counters per bucket and the `TOP` largest and longest-idle
sessions, so a census of millions of sessions holds a few dozen objects.
"""

from __future__ import annotations

import heapq
import itertools
from bisect import bisect_left
from dataclasses import dataclass, field

TOP = 20
#: Session IDs are shown this long at most: a census is for shapes, not contents.
KEY_SHOWN = 24


def pending_bounds(max_buffer_bytes: int) -> list[int]:
    """Return the upper bounds (inclusive) of the pending-bytes buckets: 0, 64 B, 1 KiB, ..."""
    bounds = [0]
    bound = 64
    while bound < max_buffer_bytes:
        bounds.append(bound)
        bound *= 16
    return [*bounds, max_buffer_bytes]


def idle_bounds(idle_timeout: float) -> list[float]:
    """Return the upper bounds (exclusive) of the idle-age buckets: 1 s, 10 s, ... the timeout."""
    bounds = [b for b in (1.0, 10.0, 60.0, 600.0, 3600.0, 86400.0) if b < idle_timeout]
    return [*bounds, idle_timeout]


def shown(session_id: bytes) -> str:
    """Return a session ID as the census shows it: printable, shortened."""
    text = session_id[:KEY_SHOWN].decode("utf-8", "backslashreplace")
    return text + ("…" if len(session_id) > KEY_SHOWN else "")


@dataclass
class Census:
    """Counts of sessions by pending bytes and by idle age, and the extremes of each."""

    pending_limits: list[int]
    idle_limits: list[float]
    now_us: int
    sessions: int = 0
    pending_total: int = 0
    by_pending: list[int] = field(default_factory=list)
    by_idle: list[int] = field(default_factory=list)
    # Min-heaps of the largest and longest idle: (pending, id) and (-last_seen, id).
    _largest: list[tuple[int, bytes]] = field(default_factory=list)
    _idlest: list[tuple[int, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # One more bucket than limits: values beyond the last (a cap lowered since, a clock).
        self.by_pending = [0] * (len(self.pending_limits) + 1)
        self.by_idle = [0] * (len(self.idle_limits) + 1)

    def add(self, session_id: bytes, pending: int, last_seen_us: int) -> None:
        """Count one session."""
        self.sessions += 1
        self.pending_total += pending
        self.by_pending[bisect_left(self.pending_limits, pending)] += 1
        idle = max(self.now_us - last_seen_us, 0) / 1e6
        # Exclusive upper bounds: an idle age equal to a bound goes to the next bucket.
        self.by_idle[bisect_left(self.idle_limits, idle + 1e-9)] += 1
        self._keep(self._largest, (pending, session_id))
        self._keep(self._idlest, (-last_seen_us, session_id))

    @staticmethod
    def _keep(heap: list[tuple[int, bytes]], item: tuple[int, bytes]) -> None:
        if len(heap) < TOP:
            heapq.heappush(heap, item)
        elif item > heap[0]:
            heapq.heapreplace(heap, item)

    def as_dict(self) -> dict[str, object]:
        """Return the census for JSON: buckets with their bounds, and the extremes."""
        pending_labels = ["0"] + [
            f"{low + 1}-{high}" for low, high in itertools.pairwise(self.pending_limits)
        ]
        idle_labels = [f"<{self.idle_limits[0]:g}s"] + [
            f"{low:g}-{high:g}s" for low, high in itertools.pairwise(self.idle_limits)
        ]
        return {
            "sessions": self.sessions,
            "pending_bytes_total": self.pending_total,
            "by_pending_bytes": [
                {"bucket": label, "le": limit, "sessions": count}
                for label, limit, count in zip(
                    [*pending_labels, "beyond"],
                    [*self.pending_limits, None],
                    self.by_pending,
                    strict=True,
                )
            ],
            "by_idle_seconds": [
                {"bucket": label, "lt": limit, "sessions": count}
                for label, limit, count in zip(
                    [*idle_labels, "beyond"], [*self.idle_limits, None], self.by_idle, strict=True
                )
            ],
            "largest": [
                {"session": shown(sid), "pending_bytes": pending}
                for pending, sid in sorted(self._largest, reverse=True)
            ],
            "longest_idle": [
                {"session": shown(sid), "idle_seconds": round((self.now_us + neg) / 1e6, 1)}
                for neg, sid in sorted(self._idlest, reverse=True)
            ],
        }
