"""Progress per partition and the stall alarm, fed clock readings: no broker."""

from __future__ import annotations

from sessions_app.core.progress import PartitionProgress, StallAlarm


def test_rate_and_seconds_since_progress() -> None:
    progress = PartitionProgress()
    progress.assigned({0, 1}, now=100.0)
    progress.applied(0, offset=599, fragments=600, now=110.0)
    progress.applied(0, offset=1199, fragments=600, now=150.0)
    assert progress.rate(0, now=160.0) == 1200 / 60
    assert progress.rate(0, now=171.0) == 600 / 60  # the first batch left the minute
    assert progress.idle_for(0, now=160.0) == 10.0
    assert progress.idle_for(1, now=160.0) == 60.0  # never moved: since it was assigned
    progress.assigned({1}, now=170.0)
    assert list(progress.partitions) == [1]


def test_lag_is_end_minus_committed_and_unknown_until_read() -> None:
    progress = PartitionProgress()
    progress.assigned({3}, now=0.0)
    assert progress.as_dict(0.0)["3"]["lag"] is None
    progress.offsets(3, committed=40, end=100)
    assert progress.as_dict(0.0)["3"]["lag"] == 60
    progress.offsets(3, committed=None, end=7)  # nothing committed yet: all of it is lag
    assert progress.as_dict(0.0)["3"]["lag"] == 7


def test_stall_raises_after_the_timeout_with_lag_and_clears_when_it_moves() -> None:
    progress = PartitionProgress()
    alarm = StallAlarm(timeout=60.0)
    progress.assigned({0, 1}, now=0.0)
    progress.offsets(0, committed=10, end=500)  # lag, never moves
    progress.offsets(1, committed=0, end=0)  # idle but nothing to do: never stalled
    assert alarm.update(progress, now=59.0) == []
    (raised,) = alarm.update(progress, now=60.0)
    assert (raised.state, raised.partition, raised.lag, raised.since) == ("raised", 0, 490, 0.0)
    assert alarm.update(progress, now=90.0) == []  # raised once, not at every look
    progress.applied(0, offset=499, fragments=490, now=95.0)
    (cleared,) = alarm.update(progress, now=96.0)
    assert (cleared.state, cleared.partition) == ("cleared", 0)
    assert [t.state for t in alarm.history] == ["raised", "cleared"]
    event = raised.as_event("host:6066")
    assert event == {
        "alarm": "stalled",
        "worker": "host:6066",
        "state": "raised",
        "partition": 0,
        "lag": 490,
        "since": 0.0,
        "time": 60.0,
    }


def test_a_stalled_partition_that_moves_away_is_cleared() -> None:
    progress = PartitionProgress()
    alarm = StallAlarm(timeout=5.0)
    progress.assigned({2}, now=0.0)
    progress.offsets(2, committed=0, end=9)
    assert [t.state for t in alarm.update(progress, now=5.0)] == ["raised"]
    progress.assigned(set(), now=6.0)  # revoked by a rebalance
    assert [(t.state, t.partition) for t in alarm.update(progress, now=6.0)] == [("cleared", 2)]
