"""The session cap: its alarm, raised at a ratio of the cap and cleared below it with
hysteresis, and the choice of the sessions an eviction takes.

Pure: it is fed counts, clock readings and candidates, and says what follows.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

CLEAR_MARGIN = 0.1
HISTORY = 100


@dataclass(frozen=True, slots=True)
class AlarmTransition:
    """One change of the alarm's state, as reported to people and the alerts topic."""

    state: str  # "raised" or "cleared"
    count: int
    cap: int
    ratio: float
    time: float

    def as_event(self, worker: str) -> dict[str, object]:
        """Return the JSON event for the alerts topic."""
        return {
            "alarm": "session-capacity",
            "worker": worker,
            "state": self.state,
            "count": self.count,
            "cap": self.cap,
            "ratio": self.ratio,
            "usage": self.count / self.cap,
            "time": self.time,
        }


@dataclass
class CapacityAlarm:
    """Warns when live sessions reach `ratio` of `cap`; clears below `ratio - 0.1`."""

    cap: int
    ratio: float = 0.8
    active: bool = False
    since: float | None = None
    history: deque[AlarmTransition] = field(default_factory=lambda: deque(maxlen=HISTORY))

    @property
    def clear_below(self) -> float:
        """Return the count the alarm clears under."""
        return self.cap * max(self.ratio - CLEAR_MARGIN, 0.0)

    def update(self, count: int, now: float) -> AlarmTransition | None:
        """Feed the current count; return the transition if the state changed."""
        if not self.active and count >= self.cap * self.ratio:
            self.active, self.since = True, now
            return self._record("raised", count, now)
        if self.active and count < self.clear_below:
            self.active, self.since = False, now
            return self._record("cleared", count, now)
        return None

    def _record(self, state: str, count: int, now: float) -> AlarmTransition:
        transition = AlarmTransition(state, count, self.cap, self.ratio, now)
        self.history.append(transition)
        return transition


#: A session an eviction may take: (last seen in µs, partition, session ID).
Candidate = tuple[int, int, bytes]


def choose_evictions(
    stored: Iterable[Candidate], touched: Iterable[Candidate], how_many: int
) -> list[Candidate]:
    """Return the `how_many` sessions to evict, longest idle first.

    `stored` are sessions the batch did not touch, from the idle index: they are
    the longest idle. When the batch opens more sessions than they make room
    for, the sessions it touched earliest (`touched`, with their new stamps) go next.
    """
    victims = sorted(stored)[:how_many]
    return victims + sorted(touched)[: how_many - len(victims)]
