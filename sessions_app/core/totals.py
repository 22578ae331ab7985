"""Running totals of what the worker did since it started: pure, no I/O."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(slots=True)
class PipelineTotals:
    """Totals the web view reports; one instance per worker process."""

    fragments_consumed: int = 0
    fragments_replayed: int = 0
    records_emitted: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    sessions_expired: int = 0
    sessions_evicted: int = 0
    sessions_overflowed: int = 0
    dead_letters: int = 0
    batches_applied: int = 0
    #: Idle flushes a crash interrupted, settled after the restart (sent or found sent).
    interrupted_flushes_settled: int = 0

    def as_dict(self) -> dict[str, int]:
        """Return the totals as a plain dict for JSON."""
        return asdict(self)
