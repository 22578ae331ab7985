"""Large records in many small fragments: whole and in order through kill -9, moves, overflow.

A session whose pending bytes pass 1 KiB keeps them in chunk keys, one per
fragment; these tests make the worker hold such sessions at every awkward
moment and check each record comes out byte for byte.
"""

from __future__ import annotations

import itertools
import json
import random

import pytest

from sessions_app.tools.loadgen import Session

from .conftest import Deployment

DELIMITER = b"\r\n"


def large_sessions(count: int, sizes: list[int], seed: int) -> list[Session]:
    """Sessions of records of the given sizes, cut into fragments of about 1 KiB.

    The cuts fall anywhere, between the delimiter's two bytes too, and some records
    are 1 byte: the smallest beside the largest.
    """
    rng = random.Random(seed)
    sessions = []
    for n in range(count):
        records = [
            bytes(rng.choice(b"abcdefgh\r") for _ in range(size)).replace(b"\r", b"x")
            for size in (*sizes, 1)
        ]
        stream = b"".join(record + DELIMITER for record in records)
        cuts = sorted({rng.randrange(1, len(stream)) for _ in range(len(stream) // 1024)})
        # A cut between \r and \n of every record's delimiter but the last.
        cuts = sorted(set(cuts) | {stream.index(DELIMITER) + 1})
        bounds = [0, *cuts, len(stream)]
        fragments = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        sessions.append(Session(f"big-{seed}-{n}".encode(), records, fragments))
    return sessions


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


@pytest.mark.xfail(
    strict=False,
    reason="known defect, open in issue 14: in about a third of runs (also on d6244ee, before "
    "the bulk recovery), when the restarted worker is stopped before it applies any new "
    "fragment, the worker that rebuilds from the changelog emits every 120 kB record corrupt",
)
def test_large_records_survive_kill_9_half_way_and_a_move_to_an_empty_disk(
    deployment: Deployment,
) -> None:
    sessions = large_sessions(6, [60_000, 120_000], seed=1)
    worker = deployment.start_worker("w1")
    deployment.produce(interleaved(sessions, 0.0, 0.4))
    worker.wait_until(
        lambda s: s["totals"]["fragments_consumed"] >= len(interleaved(sessions, 0.0, 0.4)),
        "the first 40% applied",
    )
    assert worker.stats()["live_sessions"] == len(sessions)
    # Half a record and more pending, in chunks: the lookup counts them all.
    found = json.loads(worker.get(f"/sessions/lookup?key={sessions[0].key.decode()}"))
    assert found["pending_bytes"] > 1024  # past the inline limit: in chunks
    # Killed while every record is half stored, in chunks.
    worker.kill9()
    worker.start()
    deployment.produce(interleaved(sessions, 0.4, 0.7))
    worker.wait_until(
        lambda s: s["totals"]["fragments_consumed"] >= len(interleaved(sessions, 0.4, 0.7)),
        "the next 30% applied",
    )
    # The partitions move to a worker with an empty disk: the chunks come from the changelog.
    worker.stop()
    other = deployment.start_worker("w2")
    deployment.produce(interleaved(sessions, 0.7, 1.0))
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
