"""Idle expiry, live counts, the cap with its alarm, and per-session overflow, on real workers."""

from __future__ import annotations

import json
import time
from typing import Any

from .conftest import Deployment, Record


def remnant_sessions(prefix: str, n: int) -> dict[bytes, bytes]:
    """Sessions that each leave an unfinished remnant: session ID -> remnant."""
    return {f"{prefix}-{i:05d}".encode(): f"remnant {i} \x00\xff".encode() for i in range(n)}


def send_remnants(deployment: Deployment, sessions: dict[bytes, bytes]) -> None:
    deployment.produce([(key, b"done\r\n" + tail, None) for key, tail in sessions.items()])


def by_session(records: list[Record]) -> dict[bytes, list[Record]]:
    out: dict[bytes, list[Record]] = {}
    for record in records:
        out.setdefault(record.key or b"", []).append(record)
    return out


def test_idle_sessions_are_flushed_exactly_once_and_deleted(deployment: Deployment) -> None:
    deployment.env["SESSIONS_IDLE_TIMEOUT"] = "1"
    worker = deployment.start_worker()
    sessions = remnant_sessions("idle", 300)
    send_remnants(deployment, sessions)
    # One session keeps talking and must outlive the others.
    for _ in range(12):
        deployment.produce([(b"chatty", b"x", None)])
        time.sleep(0.25)
    stats = worker.wait_until(lambda s: s["totals"]["sessions_expired"] >= 300, "300 expired")
    assert stats["live_sessions"] == 1
    expired = deployment.read("expired", 300)
    flushed = by_session(expired)
    assert set(flushed) == set(sessions)
    for key, tail in sessions.items():
        (record,) = flushed[key]
        assert (record.value, record.headers["reason"], record.headers["seq"]) == (
            tail,
            b"idle",
            b"1",
        )
    time.sleep(2.5)
    (chatty,) = by_session(deployment.read("expired", 301, timeout=5))[b"chatty"]
    assert chatty.value == b"x" * 12


def test_kill_9_during_expiry_neither_loses_nor_repeats_a_flush(deployment: Deployment) -> None:
    deployment.env["SESSIONS_IDLE_TIMEOUT"] = "2"
    worker = deployment.start_worker()
    sessions = remnant_sessions("crash", 20_000)
    send_remnants(deployment, sessions)
    worker.wait_until(lambda s: s["totals"]["sessions_expired"] >= 3000, "expiry under way")
    worker.kill9()
    worker.start()
    worker.wait_until(lambda s: s["live_sessions"] == 0, "all sessions expired", timeout=90)
    time.sleep(3)  # an expired session that came back would expire a second time now
    flushed = by_session(deployment.read("expired", len(sessions), timeout=60))
    repeated = {key: len(v) for key, v in flushed.items() if len(v) > 1}
    assert not repeated, f"{len(repeated)} sessions flushed more than once"
    assert set(flushed) == set(sessions)
    assert all(flushed[key][0].value == tail for key, tail in sessions.items())
    assert worker.stats()["live_sessions"] == 0


def test_live_counts_survive_restart_and_partition_moves(deployment: Deployment) -> None:
    first = deployment.start_worker("w1")
    sessions = remnant_sessions("count", 400)
    send_remnants(deployment, sessions)
    first.wait_until(lambda s: s["live_sessions"] == 400, "400 live")

    first.stop()
    first.start()
    assert first.stats()["live_sessions"] == 400
    first.kill9()
    first.start()
    assert first.stats()["live_sessions"] == 400

    second = deployment.start_worker("w2")

    def split_evenly(_: object) -> bool:
        a, b = first.stats(), second.stats()
        return bool(a["live_sessions_by_partition"]) and bool(b["live_sessions_by_partition"])

    first.wait_until(split_evenly, "partitions split between two workers")
    assert first.stats()["live_sessions"] + second.stats()["live_sessions"] == 400
    first.stop()
    second.wait_until(lambda s: s["live_sessions"] == 400, "all 400 on the second worker")
    assert len(second.stats()["live_sessions_by_partition"]) == deployment.partitions


def test_alarm_raised_at_80_percent_and_cleared_below_70(deployment: Deployment) -> None:
    deployment.env["SESSIONS_MAX_SESSIONS"] = "100"
    worker = deployment.start_worker()
    keys = [f"alarm-{i:03d}".encode() for i in range(80)]
    deployment.produce([(key, b"open", None) for key in keys[:79]])
    worker.wait_until(lambda s: s["live_sessions"] == 79, "79 live")
    assert worker.stats()["alarm"]["state"] == "ok"
    deployment.produce([(keys[79], b"open", None)])
    stats = worker.wait_until(lambda s: s["alarm"]["state"] == "raised", "alarm raised")
    assert stats["live_sessions"] == 80
    # Down to 72: below 80%, not below 70%: the alarm holds.
    deployment.produce([(key, None, None) for key in keys[:8]])
    worker.wait_until(lambda s: s["live_sessions"] == 72, "72 live")
    assert worker.stats()["alarm"]["state"] == "raised"
    deployment.produce([(key, None, None) for key in keys[8:11]])
    worker.wait_until(lambda s: s["alarm"]["state"] == "ok", "alarm cleared")
    events = [json.loads(r.value or b"") for r in deployment.read("alerts", 2)]
    assert [(e["state"], e["count"], e["cap"], e["ratio"]) for e in events] == [
        ("raised", 80, 100, 0.8),
        ("cleared", 69, 100, 0.8),
    ]
    assert all(e["worker"] and e["time"] > 0 for e in events)
    assert "Session capacity alarm raised" in worker.log()


def test_cap_evicts_the_longest_idle_sessions(deployment: Deployment) -> None:
    deployment.env["SESSIONS_MAX_SESSIONS"] = "50"
    worker = deployment.start_worker()
    sessions = remnant_sessions("evict", 80)
    counts: list[int] = []

    def watch(stats: dict[str, Any]) -> bool:
        counts.append(stats["live_sessions"])
        return bool(stats["totals"]["sessions_evicted"] == 30)

    # One at a time: sessions that arrive in one fetch are equally idle, in no order.
    for n, (key, tail) in enumerate(sessions.items(), 1):
        deployment.produce([(key, b"done\r\n" + tail, None)])
        worker.wait_until(lambda s, n=n: watch(s) or s["totals"]["fragments_consumed"] == n, "")
    stats = worker.wait_until(watch, "30 evicted")
    assert stats["live_sessions"] == 50
    assert max(counts) == 50
    evicted = by_session(deployment.read("expired", 30))
    assert set(evicted) == set(list(sessions)[:30])
    for key, (record,) in evicted.items():
        assert (record.value, record.headers["reason"]) == (sessions[key], b"evicted")


def test_cap_rejects_new_sessions_to_the_dead_letter_topic(deployment: Deployment) -> None:
    deployment.env["SESSIONS_MAX_SESSIONS"] = "50"
    deployment.env["SESSIONS_CAP_POLICY"] = "reject"
    worker = deployment.start_worker()
    sessions = remnant_sessions("reject", 80)
    send_remnants(deployment, sessions)
    stats = worker.wait_until(lambda s: s["totals"]["dead_letters"] == 30, "30 rejected")
    assert stats["live_sessions"] == 50
    rejected = deployment.read("dlq", 30)
    assert len(rejected) == 30
    assert {r.headers["error.stage"] for r in rejected} == {b"capacity"}
    assert all(r.value == b"done\r\n" + sessions[r.key or b""] for r in rejected)
    accepted = {r.key for r in deployment.read("output", 50)}
    assert accepted.isdisjoint(r.key for r in rejected)
    assert len(accepted) == 50


def test_overflowing_session_is_flushed_and_continues(deployment: Deployment) -> None:
    deployment.env["SESSIONS_MAX_BUFFER_BYTES"] = "100"
    deployment.start_worker()
    deployment.produce(
        [(b"big", b"a" * 60, 1), (b"big", b"b" * 60, 1), (b"big", b"c" * 30 + b"\r\n", 1)]
    )
    (overflow,) = deployment.read("expired", 1)
    assert (overflow.value, overflow.headers["reason"]) == (b"a" * 60 + b"b" * 60, b"overflow")
    (record,) = deployment.read("output", 1)
    assert (record.value, record.headers["seq"]) == (b"c" * 30, b"0")
