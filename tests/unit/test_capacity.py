"""The capacity alarm: raised at the ratio, cleared below ratio - 0.1."""

from __future__ import annotations

from sessions_app.core.capacity import CapacityAlarm, choose_evictions


def test_raised_at_ratio_and_cleared_with_hysteresis() -> None:
    alarm = CapacityAlarm(cap=100, ratio=0.8)
    states = []
    for t, count in enumerate([10, 79, 80, 95, 75, 70, 69, 79, 80]):
        transition = alarm.update(count, float(t))
        states.append(transition.state if transition else None)
    assert states == [None, None, "raised", None, None, None, "cleared", None, "raised"]
    assert [t.count for t in alarm.history] == [80, 69, 80]
    assert alarm.active and alarm.since == 8.0


def test_event_carries_worker_count_cap_ratio_state_and_time() -> None:
    alarm = CapacityAlarm(cap=10, ratio=0.5)
    transition = alarm.update(5, 123.0)
    assert transition is not None
    assert transition.as_event("host:6066") == {
        "alarm": "session-capacity",
        "worker": "host:6066",
        "state": "raised",
        "count": 5,
        "cap": 10,
        "ratio": 0.5,
        "usage": 0.5,
        "time": 123.0,
    }


def test_history_keeps_the_last_hundred() -> None:
    alarm = CapacityAlarm(cap=10, ratio=0.8)
    for t in range(300):
        alarm.update(10 if t % 2 == 0 else 0, float(t))
    assert len(alarm.history) == 100
    assert alarm.history[-1].time == 299.0


def test_eviction_takes_untouched_sessions_first_then_the_batch_s_earliest() -> None:
    stored = [(300, 1, b"c"), (100, 0, b"a"), (200, 0, b"b")]
    touched = [(1_002, 1, b"y"), (1_001, 0, b"x")]
    assert choose_evictions(stored, touched, 2) == [(100, 0, b"a"), (200, 0, b"b")]
    assert choose_evictions(stored, touched, 4) == [
        (100, 0, b"a"),
        (200, 0, b"b"),
        (300, 1, b"c"),
        (1_001, 0, b"x"),
    ]
    assert choose_evictions([], touched, 5) == [(1_001, 0, b"x"), (1_002, 1, b"y")]
