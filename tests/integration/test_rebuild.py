"""A worker that lost its disk rebuilds every session from the changelog exactly as it was."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import rocksdict

from sessions_app.tools import harness
from sessions_app.tools.loadgen import generate

from .conftest import Deployment, in_phases, large_sessions

#: Faust's key for the changelog offset a store has applied up to.
OFFSET_KEY = b"__faust\x00offset__"


def dump(data_dir: Path) -> dict[str, dict[bytes, bytes]]:
    """Return every key and value of every table partition in a stopped worker's data dir."""
    found: dict[str, dict[bytes, bytes]] = {}
    for path in sorted(data_dir.glob("v1/tables/session_buffers-*.db")):
        db = rocksdict.Rdict(str(path), rocksdict.Options(raw_mode=True))
        try:
            found[path.name] = dict(db.items())
        finally:
            db.close()
    return found


def wait_committed(deployment: Deployment, total: int, timeout: float = 30.0) -> None:
    """Wait until the worker's group has committed `total` input offsets in all."""
    deadline = time.monotonic() + timeout
    while True:
        committed = asyncio.run(
            harness.committed_offsets(
                deployment.broker.bootstrap,
                deployment.env["SESSIONS_APP_ID"],
                deployment.topic("input"),
                deployment.partitions,
            )
        )
        if sum(offset or 0 for offset in committed.values()) >= total:
            return
        assert time.monotonic() < deadline, f"committed {committed}, want {total} in all"
        time.sleep(0.2)


def test_a_wiped_worker_rebuilds_sessions_in_every_state_exactly(
    deployment: Deployment,
) -> None:
    """Pending tails inline and in chunks, closed, expired, evicted and overflowed sessions.

    The rebuilt store holds the same keys and values, byte for byte, as the store the
    changelog was written from: buffers, chunks, flush markers, watermarks, and the
    idle index and live count derived locally from them; and the sessions go on.
    """
    worker = deployment.worker()
    worker.env = {
        **deployment.env,
        "SESSIONS_IDLE_TIMEOUT": "2",
        "SESSIONS_MAX_SESSIONS": "20",
        "SESSIONS_MAX_BUFFER_BYTES": "4096",
        "SESSIONS_STANDBY_REPLICAS": "0",
    }
    worker.start()
    # Expired: idle past the timeout, its tail flushed with a marker that is then deleted.
    deployment.produce([(b"e-0", b"done\r\nexpired tail", None)])
    worker.wait_for("sessions_expired", 1, timeout=60)
    worker.stop()

    worker.env = {**worker.env, "SESSIONS_IDLE_TIMEOUT": str(86400)}
    worker.start()
    # Each phase is applied before the next is sent, so what a later phase closes or evicts
    # reaches the changelog as a stored buffer and then its tombstone.
    phases: list[list[harness.Item]] = [
        # To be evicted: the longest idle when the cap of 20 is passed.
        [(f"v-{n}".encode(), b"old\r\nevicted tail", None) for n in range(4)],
        # Pending inline, with seq numbers past 0; one to be closed.
        [(f"p-{n:02d}".encode(), b"a\r\nb\r\ntail %d" % n, None) for n in range(16)]
        + [(b"c-0", b"x\r\nclosed tail", None)],
        # Pending in chunks: more than the 1 KiB kept inline, without a delimiter.
        # Overflowed: past the 4,096-byte cap, the head flushed and the rest pending.
        # Closed: a tombstone ends it.
        [(b"big-0", bytes([65 + n]) * 800, None) for n in range(3)]
        + [(b"o-0", b"%d" % n * 1000, None) for n in range(5)]
        + [(b"c-0", None, None)],
    ]
    sent = 0
    for phase in phases:
        deployment.produce(phase)
        sent += len(phase)
        stats = worker.wait_for("fragments_consumed", sent, timeout=60)
    # Every input offset committed: the rebuilt worker must find nothing to apply.
    wait_committed(deployment, 1 + sent)
    worker.stop()
    totals = stats["totals"]
    for total in ("sessions_evicted", "sessions_overflowed", "sessions_closed"):
        assert totals[total] >= 1, (total, totals)
    written = dump(worker.data_dir)
    assert len(written) == deployment.partitions

    shutil.rmtree(worker.data_dir)
    worker.start()
    worker.stop()
    rebuilt = dump(worker.data_dir)
    assert set(rebuilt) == set(written)
    for name, keys in written.items():
        assert set(rebuilt[name]) == set(keys), name
        for key, value in keys.items():
            assert rebuilt[name][key] == value, (name, key)
    kinds = {key[:1] for keys in rebuilt.values() for key in keys}
    # Buffers, chunks, the idle index, live counts and watermarks came back.
    assert {b"s", b"k", b"i", b"c", b"w"} <= kinds, kinds

    worker.start()
    assert worker.stats()["live_sessions"] == stats["live_sessions"] <= 20
    deployment.produce([(b"p-03", b"\r\n", None), (b"big-0", b"\r\n", None)])
    want = {(b"p-03", b"tail 3", b"2"), (b"big-0", b"A" * 800 + b"B" * 800 + b"C" * 800, b"0")}
    records = asyncio.run(
        harness.read_topic(
            deployment.broker.bootstrap,
            deployment.topic("output"),
            lambda got: want <= {(r.key, r.value, r.headers.get("seq")) for r in got},
            timeout=60,
        )
    )
    assert want <= {(r.key, r.value, r.headers.get("seq")) for r in records}


def test_fragments_sent_while_no_worker_ran_are_applied_by_one_that_rebuilds(
    deployment: Deployment,
) -> None:
    """A worker on an empty disk rebuilds, then applies the backlog past the committed offsets.

    The backlog waits on the broker while the new worker rebuilds: its consumer may fetch
    it before the table recovery ends, and must apply every fragment once recovery has
    sought the input back to the committed offsets. Sessions inline and in chunks.
    """
    sessions = generate("b", 40, 6, b"\r\n", seed=11) + large_sessions(4, [30_000], seed=11)
    phases = in_phases(sessions, 3, seed=11)
    first = deployment.start_worker("w1")
    deployment.produce(phases[0])
    deployment.wait_applied(first, phases[0])
    wait_committed(deployment, sum(len(phase) for phase in phases[:1]))
    first.stop()
    # The backlog: sent while no worker runs.
    deployment.produce(phases[1])
    second = deployment.start_worker("w2")
    deployment.wait_applied(second, phases[0] + phases[1])
    deployment.produce(phases[2])
    check = deployment.verify(sessions)
    assert check.ok, check.summary() + "\n" + second.log()[-3000:]
