"""Progress per input partition, and the alarm for a partition that stopped: pure, no I/O.

A consumer can stop fetching with no error (faust-streaming issues #175,
#523, #532, #640), and a store that refuses writes stops the agent while the
worker stays up. Both look the same from outside: a partition that has lag
but makes no progress. `PartitionProgress` keeps, per partition, when the
pipeline last applied its fragments and how many it applied over the last
minute; `StallAlarm` raises when a partition has had lag and no progress for
the stall timeout, and clears when it moves again. Times are seconds of the
caller's clock.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

#: The window of the rate a partition is reported at.
RATE_WINDOW = 60.0


@dataclass(slots=True)
class PartitionState:
    """One input partition as this worker sees it."""

    since: float  # when the worker got the partition, or last saw it progress
    applied_offset: int = -1
    applied: deque[tuple[float, int]] = field(default_factory=deque)  # (time, fragments)
    committed: int | None = None
    end: int | None = None

    @property
    def lag(self) -> int | None:
        """Return records on the broker after the committed offset, None if not known yet."""
        if self.end is None:
            return None
        return max(self.end - (self.committed or 0), 0)


class PartitionProgress:
    """Progress of the input partitions a worker owns."""

    def __init__(self) -> None:
        self.partitions: dict[int, PartitionState] = {}

    def assigned(self, partitions: set[int], now: float) -> None:
        """Track exactly `partitions`: new ones start their clock now, revoked ones go."""
        for gone in set(self.partitions) - partitions:
            del self.partitions[gone]
        for partition in partitions - set(self.partitions):
            self.partitions[partition] = PartitionState(since=now)

    def applied(self, partition: int, offset: int, fragments: int, now: float) -> None:
        """Record that fragments of a partition, up to `offset`, were applied and persisted."""
        state = self.partitions.get(partition)
        if state is None:  # applied before the monitor first looked: the pipeline owns it
            state = self.partitions[partition] = PartitionState(since=now)
        if offset > state.applied_offset:
            state.applied_offset = offset
            state.since = now
        state.applied.append((now, fragments))
        while state.applied and now - state.applied[0][0] > RATE_WINDOW:
            state.applied.popleft()

    def offsets(self, partition: int, committed: int | None, end: int | None) -> None:
        """Record the group's committed offset and the broker's end offset of a partition."""
        state = self.partitions.get(partition)
        if state is not None:
            state.committed, state.end = committed, end

    def rate(self, partition: int, now: float) -> float:
        """Return fragments per second applied over the last RATE_WINDOW seconds."""
        state = self.partitions.get(partition)
        if state is None:
            return 0.0
        recent = sum(n for at, n in state.applied if now - at <= RATE_WINDOW)
        return recent / RATE_WINDOW

    def idle_for(self, partition: int, now: float) -> float:
        """Return seconds since the partition last progressed (or was assigned)."""
        state = self.partitions.get(partition)
        return 0.0 if state is None else max(now - state.since, 0.0)

    def totals(self, now: float) -> tuple[int | None, float]:
        """Return the lag over every partition (None if one is not known) and fragments/s."""
        lags = [state.lag for state in self.partitions.values()]
        lag = None if any(lag is None for lag in lags) else sum(lag or 0 for lag in lags)
        return lag, round(sum(self.rate(p, now) for p in self.partitions), 1)

    def as_dict(self, now: float) -> dict[str, dict[str, object]]:
        """Return each partition's offsets, lag, rate and seconds since progress, for JSON."""
        return {
            str(partition): {
                "committed_offset": state.committed,
                "end_offset": state.end,
                "lag": state.lag,
                "applied_offset": state.applied_offset,
                "fragments_per_second": round(self.rate(partition, now), 1),
                "seconds_since_progress": round(self.idle_for(partition, now), 1),
            }
            for partition, state in sorted(self.partitions.items())
        }


@dataclass(frozen=True, slots=True)
class StallTransition:
    """A partition's stall alarm raised or cleared, as reported on the alerts topic."""

    state: str  # "raised" or "cleared"
    partition: int
    lag: int
    since: float  # when the partition last progressed
    time: float

    def as_event(self, worker: str) -> dict[str, object]:
        """Return the JSON event for the alerts topic."""
        return {
            "alarm": "stalled",
            "worker": worker,
            "state": self.state,
            "partition": self.partition,
            "lag": self.lag,
            "since": self.since,
            "time": self.time,
        }


@dataclass
class StallAlarm:
    """Raised for a partition with lag and no progress for `timeout` seconds."""

    timeout: float
    stalled: dict[int, StallTransition] = field(default_factory=dict)
    history: deque[StallTransition] = field(default_factory=lambda: deque(maxlen=100))

    def update(self, progress: PartitionProgress, now: float) -> list[StallTransition]:
        """Look at every partition; return the transitions since the last look."""
        transitions = []
        for partition in set(self.stalled) - set(progress.partitions):
            transitions.append(self._clear(partition, 0, now))  # revoked: not ours to watch
        for partition, state in progress.partitions.items():
            lag = state.lag or 0
            idle = now - state.since
            if partition not in self.stalled and lag > 0 and idle >= self.timeout:
                raised = StallTransition("raised", partition, lag, state.since, now)
                self.stalled[partition] = raised
                transitions.append(raised)
            elif partition in self.stalled and (lag == 0 or idle < self.timeout):
                transitions.append(self._clear(partition, lag, now))
        self.history.extend(transitions)
        return transitions

    def _clear(self, partition: int, lag: int, now: float) -> StallTransition:
        raised = self.stalled.pop(partition)
        return StallTransition("cleared", partition, lag, raised.since, now)
