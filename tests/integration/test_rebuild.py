"""A worker that lost its disk rebuilds every session from the changelog exactly as it was."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import rocksdict

from sessions_app.tools import harness

from .conftest import Deployment

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
    items: list[harness.Item] = []
    # Evicted: the longest idle when the cap of 20 is passed.
    items += [(f"v-{n}".encode(), b"old\r\nevicted tail", None) for n in range(4)]
    # Pending inline, with seq numbers past 0.
    items += [(f"p-{n:02d}".encode(), b"a\r\nb\r\ntail %d" % n, None) for n in range(16)]
    # Pending in chunks: more than the 1 KiB kept inline, without a delimiter.
    items += [(b"big-0", bytes([65 + n]) * 800, None) for n in range(3)]
    # Overflowed: past the 4,096-byte cap, the head flushed and the rest pending.
    items += [(b"o-0", b"%d" % n * 1000, None) for n in range(5)]
    # Closed: a tombstone ends it.
    items += [(b"c-0", b"x\r\nclosed tail", None), (b"c-0", None, None)]
    deployment.produce(items)
    stats = worker.wait_for("fragments_consumed", len(items), timeout=60)
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
    for name, keys in written.items():
        assert set(rebuilt[name]) == set(keys), name
        for key, value in keys.items():
            assert rebuilt[name][key] == value, (name, key)
        # Something of every kind came back, not just an empty store.
        assert any(key.startswith(b"i") for key in keys) or not keys

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
