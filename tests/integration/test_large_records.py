"""Large records in many small fragments: whole and in order through kill -9, moves, overflow.

A session whose pending bytes pass 1 KiB keeps them in chunk keys, one per
fragment; these tests make the worker hold such sessions at every awkward
moment and check each record comes out byte for byte.
"""

from __future__ import annotations

import json

import pytest

from sessions_app.tools.loadgen import Session

from .conftest import Deployment, large_sessions


def interleaved(
    sessions: list[Session], start: float, end: float
) -> list[tuple[bytes, bytes, None]]:
    """The fragments between fractions `start` and `end` of every session, interleaved."""
    runs = []
    for s in sessions:
        a, b = int(len(s.fragments) * start), int(len(s.fragments) * end)
        runs.append([(s.key, fragment, None) for fragment in s.fragments[a:b]])
    items = []
    while any(runs):
        for run in runs:
            if run:
                items.append(run.pop(0))
    return items


@pytest.mark.parametrize("then", ["applied", "waiting"])
def test_large_records_survive_kill_9_half_way_and_a_move_to_an_empty_disk(
    deployment: Deployment, then: str
) -> None:
    """Killed while every record is half stored in chunks, restarted, then moved.

    `applied`: the restarted worker applies the next phase before it stops. `waiting`:
    it stops at once, so the next phase waits past the committed offsets for the worker
    that rebuilds the chunks from the changelog.
    """
    sessions = large_sessions(6, [60_000, 120_000], seed=1)
    phases = [interleaved(sessions, a, b) for a, b in ((0.0, 0.4), (0.4, 0.7), (0.7, 1.0))]
    worker = deployment.start_worker("w1")
    deployment.produce(phases[0])
    deployment.wait_applied(worker, phases[0])
    assert worker.stats()["live_sessions"] == len(sessions)
    # Half a record and more pending, in chunks: the lookup counts them all.
    found = json.loads(worker.get(f"/sessions/lookup?key={sessions[0].key.decode()}"))
    assert found["pending_bytes"] > 1024  # past the inline limit: in chunks
    # Killed while every record is half stored, in chunks.
    worker.kill9()
    worker.start()
    deployment.produce(phases[1])
    if then == "applied":
        deployment.wait_applied(worker, phases[0] + phases[1])
    # The partitions move to a worker with an empty disk: the chunks come from the changelog.
    worker.stop()
    other = deployment.start_worker("w2")
    deployment.produce(phases[2])
    check = deployment.verify(sessions)
    assert check.ok, check.summary() + other.log()[-3000:]


def test_a_chunked_session_that_overflows_loses_nothing(deployment: Deployment) -> None:
    deployment.env["SESSIONS_MAX_BUFFER_BYTES"] = "50000"
    (session,) = large_sessions(1, [180_000], seed=2)
    worker = deployment.start_worker()
    deployment.produce([(session.key, fragment, None) for fragment in session.fragments])
    worker.wait_for("fragments_consumed", len(session.fragments))
    heads = [r for r in deployment.read_until("expired", lambda rs: len(rs) >= 3) if r.key]
    assert all(h.headers["reason"] == b"overflow" and h.headers["seq"] == b"0" for h in heads)
    assert all(len(h.value or b"") <= 50_000 for h in heads)
    records = deployment.read("output", 2)
    first = next(r for r in records if r.headers["seq"] == b"0")
    # Expired heads plus the emitted tail give the whole record, byte for byte.
    assert b"".join(h.value or b"" for h in heads) + (first.value or b"") == session.records[0]
    assert [r.value for r in records if r.headers["seq"] == b"1"] == [session.records[1]]
