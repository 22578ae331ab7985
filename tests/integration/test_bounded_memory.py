"""Idle expiry, live counts, the cap with its alarm, and per-session overflow, on real workers."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from sessions_app.tools import harness

from .conftest import Deployment, Record, Worker


def remnant_sessions(prefix: str, n: int) -> dict[bytes, bytes]:
    """Sessions that each leave an unfinished remnant: session ID -> remnant."""
    return dict(harness.remnant_sessions(prefix, 0, n))


def by_session(records: list[Record]) -> dict[bytes, list[Record]]:
    out: dict[bytes, list[Record]] = {}
    for record in records:
        out.setdefault(record.key or b"", []).append(record)
    return out


def test_idle_sessions_are_flushed_exactly_once_and_deleted(deployment: Deployment) -> None:
    deployment.env["SESSIONS_IDLE_TIMEOUT"] = "1"
    worker = deployment.start_worker()
    sessions = remnant_sessions("idle", 300)
    deployment.send_remnants(sessions)
    # One session keeps talking, a fragment as soon as the last one is in, until the
    # others are gone: it must outlive them.
    chatty = 0
    while True:
        deployment.produce([(b"chatty", b"x", None)])
        chatty += 1
        stats = worker.wait_for("fragments_consumed", len(sessions) + chatty)
        if stats["totals"]["sessions_expired"] >= 300:
            break
    assert stats["totals"]["sessions_expired"] == 300
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
    # Silent now, the chatty session goes too, with everything it said.
    worker.wait_for("sessions_expired", 301)
    flushed = by_session(deployment.read("expired", 301))
    assert sum(map(len, flushed.values())) == 301
    (last,) = flushed[b"chatty"]
    assert last.value == b"x" * chatty


def expired_topic_end(deployment: Deployment) -> int:
    """Return how many records the expired topic holds, from its end offsets.

    The workers send one record per producer batch here, the case whose end offsets the
    embedded broker reports right (shared/BROKER.md).
    """

    async def total() -> int:
        consumer = AIOKafkaConsumer(bootstrap_servers=deployment.broker.bootstrap)
        await consumer.start()
        try:
            topic = deployment.topic("expired")
            tps = [TopicPartition(topic, p) for p in range(deployment.partitions)]
            return sum((await consumer.end_offsets(tps)).values())
        finally:
            await consumer.stop()

    return asyncio.run(total())


def kill_mid_flush(deployment: Deployment, worker: Worker, sent_before: int) -> None:
    """Kill the worker while remnants it sent are on the expired topic but not yet counted.

    A sweep step counts its sessions as expired only after its last step (markers
    deleted); remnants on the expired topic beyond that count, with the count unchanged
    after they were seen, mean a step is between sending and deleting its markers.
    """
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        counted = worker.stats()["totals"]["sessions_expired"]
        sent = expired_topic_end(deployment) - sent_before
        if sent > counted and worker.stats()["totals"]["sessions_expired"] == counted:
            worker.kill9()
            return
    raise AssertionError(f"never caught a flush between its steps\n{worker.log()[-3000:]}")


def test_kill_9_during_expiry_neither_loses_nor_repeats_a_flush(deployment: Deployment) -> None:
    """Killed mid-sweep until a restart finds an idle flush the kill interrupted, and settles it.

    Each kill comes once a sweep step's remnants are on the expired topic and its markers
    not yet deleted (kill_mid_flush). The step may still finish in the milliseconds
    before the kill lands, so the worker is restarted and killed again, at most four
    times, until a restart reports a settled marker.
    """
    deployment.env["SESSIONS_IDLE_TIMEOUT"] = "2"
    worker = deployment.start_worker()
    sessions = remnant_sessions("crash", 8_000)
    # Remnants alone: no record out before the expiry, which is what this test is about.
    deployment.produce([(key, tail, None) for key, tail in sessions.items()])
    sent_before = 0
    for kills in range(1, 5):
        kill_mid_flush(deployment, worker, sent_before)
        sent_before = expired_topic_end(deployment)
        worker.start()
        # Markers are settled before a sweep expires anything: once one has, or none is
        # left to expire, the count is final for this run.
        stats = worker.wait_until(
            lambda s: s["totals"]["sessions_expired"] > 0 or s["live_sessions"] == 0,
            "markers settled",
        )
        if stats["totals"]["interrupted_flushes_settled"] > 0:
            break
        assert stats["live_sessions"] > 0, f"no kill of {kills} interrupted a flush"
    else:
        raise AssertionError("four kills, none between a flush's steps")
    worker.wait_until(lambda s: s["live_sessions"] == 0, "all sessions expired", timeout=90)
    # An expired session that came back would be live again, or flushed a second time.
    flushed = by_session(deployment.read("expired", len(sessions)))
    repeated = {key: len(v) for key, v in flushed.items() if len(v) > 1}
    assert not repeated, f"{len(repeated)} sessions flushed more than once"
    assert set(flushed) == set(sessions)
    assert all(flushed[key][0].value == tail for key, tail in sessions.items())
    assert worker.stats()["live_sessions"] == 0


def test_an_expired_session_stays_gone_where_its_partition_moves(deployment: Deployment) -> None:
    """Sessions expired on one worker do not come back on a worker with an empty data dir.

    The second worker rebuilds buffers and idle index from the changelog. An expired
    session that came back would be live there, or be flushed again by its first sweep,
    which runs before it expires the probe sent after it started; a new fragment for an
    expired session must start a new session at seq 0.
    """
    deployment.env["SESSIONS_IDLE_TIMEOUT"] = "1"
    first = deployment.start_worker("w1")
    sessions = remnant_sessions("gone", 200)
    deployment.send_remnants(sessions)
    first.wait_for("sessions_expired", 200)
    first.stop()

    second = deployment.start_worker("w2")
    assert second.stats()["live_sessions"] == 0
    gone = next(iter(sessions))
    deployment.produce([(gone, b"new\r\n", None), (b"probe", b"tail", None)])
    second.wait_for("sessions_expired", 2)
    flushed = by_session(deployment.read("expired", 201))
    assert sum(map(len, flushed.values())) == 201
    assert set(flushed) == {*sessions, b"probe"}
    assert [(r.value, r.headers["reason"]) for r in flushed[b"probe"]] == [(b"tail", b"idle")]
    output = by_session(deployment.read("output", 201))
    assert [(r.value, r.headers["seq"]) for r in output[gone]] == [(b"done", b"0"), (b"new", b"0")]


def test_live_counts_survive_restart_and_partition_moves(deployment: Deployment) -> None:
    first = deployment.start_worker("w1")
    sessions = remnant_sessions("count", 400)
    deployment.send_remnants(sessions)
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

    # Ten at a time, each ten sent once the ten before are applied: a batch stamps its
    # sessions in its own order (partition by partition), but all after the batches
    # before it, so every eviction takes whole tens, oldest first.
    keys = list(sessions)
    for start in range(0, len(keys), 10):
        deployment.send_remnants({key: sessions[key] for key in keys[start : start + 10]})
        worker.wait_until(
            lambda s, n=start + 10: watch(s) or s["totals"]["fragments_consumed"] == n,
            f"{start + 10} fragments applied",
        )
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
    deployment.send_remnants(sessions)
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
    # The 120 pending bytes go out in pieces of at most the cap, in order, with the
    # record's seq; the tail follows with the same seq: heads plus tail are the record.
    heads = deployment.read("expired", 2)
    assert [(r.value, r.headers["reason"], r.headers["seq"]) for r in heads] == [
        (b"a" * 60 + b"b" * 40, b"overflow", b"0"),
        (b"b" * 20, b"overflow", b"0"),
    ]
    (record,) = deployment.read("output", 1)
    assert (record.value, record.headers["seq"]) == (b"c" * 30, b"0")
