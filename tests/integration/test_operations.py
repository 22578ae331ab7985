"""Running it in production: lag and progress per partition, a real stall, a store that fails."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync
from sessions_app.tools.loadgen import generate, interleave

from .conftest import Deployment, Worker, partition_of


def alarms(worker: Worker) -> dict[str, Any]:
    return json.loads(worker.get("/alarms/"))  # type: ignore[no-any-return]


def probe(worker: Worker, path: str) -> tuple[int, dict[str, Any]]:
    """GET a probe of the worker: its status code and JSON body, 503 included."""
    try:
        return 200, json.loads(worker.get(path))
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def readyz(worker: Worker) -> tuple[int, dict[str, Any]]:
    return probe(worker, "/readyz")


def livez(worker: Worker) -> tuple[int, dict[str, Any]]:
    return probe(worker, "/livez")


def test_lag_and_progress_per_partition_in_stats_and_metrics(deployment: Deployment) -> None:
    worker = deployment.start_worker()
    # 100 records to each of the 4 partitions, each fragment a complete record.
    deployment.produce([(b"s%d" % i, b"record\r\n", i % 4) for i in range(400)])

    def caught_up(stats: dict[str, Any]) -> bool:
        parts = stats["partitions"]
        return len(parts) == 4 and all(
            p["committed_offset"] == 100 and p["end_offset"] == 100 for p in parts.values()
        )

    stats = worker.wait_until(caught_up, "offsets committed and read back", timeout=60)
    for partition in stats["partitions"].values():
        assert partition["lag"] == 0
        assert partition["applied_offset"] == 99
        assert partition["fragments_per_second"] == pytest.approx(100 / 60, abs=0.1)
        assert 0 <= partition["seconds_since_progress"] < 60
    metrics = worker.get("/metrics").decode()
    for p in range(4):
        assert re.search(rf'^sessions_consumer_lag{{partition="{p}"}} 0\.0$', metrics, re.M)
        assert re.search(
            rf'^sessions_consumer_committed_offset{{partition="{p}"}} 100\.0$', metrics, re.M
        )
        assert re.search(rf'^sessions_partition_stalled{{partition="{p}"}} 0\.0$', metrics, re.M)
    assert alarms(worker)["active"] == []


@pytest.fixture
def own_broker() -> Iterator[EmbeddedBroker]:
    """A broker of the test's own: it gets frozen."""
    with EmbeddedBroker() as running:
        yield running


def test_a_partition_that_stops_moving_raises_the_stall_alarm_and_clears_it(
    own_broker: EmbeddedBroker, deployment: Deployment
) -> None:
    deployment.broker = own_broker
    deployment.env["SESSIONS_BROKER_URL"] = own_broker.url
    deployment.env["SESSIONS_STALL_TIMEOUT"] = "3"
    deployment.env["SESSIONS_PARTITIONS"] = "1"
    # No restart here: the producer may batch as in production, so a batch takes well under
    # the stall timeout and only the freeze below stalls the partition.
    del deployment.env["SESSIONS_PRODUCER_MAX_BATCH_SIZE"]
    for name in ("INPUT", "OUTPUT", "EXPIRED", "DLQ", "ALERTS"):
        create_topics_sync(own_broker.bootstrap, [deployment.env[f"SESSIONS_{name}_TOPIC"]], 1)
    worker = deployment.start_worker()
    sessions = generate("stall", 6_000, 20, b"\r\n", seed=7)
    deployment.produce([(key, frag, 0) for key, frag in interleave(sessions, seed=7)])
    # The worker is at it and the monitor has seen lag: freeze the broker under it. The
    # batch in hand waits for acknowledgements that cannot come: a real stall.
    worker.wait_until(
        lambda s: s["totals"]["fragments_consumed"] > 0 and (s["partitions"]["0"]["lag"] or 0) > 0,
        "processing, with lag seen",
    )
    assert alarms(worker)["transitions"] == [], "a stall before the freeze: slow the load"
    assert own_broker.process is not None
    own_broker.process.send_signal(signal.SIGSTOP)
    fragments = sum(len(s.fragments) for s in sessions)
    try:
        # Work was left: the stall is real, not an idle worker's stale lag.
        at_freeze = worker.stats()["totals"]["fragments_consumed"]
        assert at_freeze < fragments, "the input was drained before the freeze: grow the load"
        raised = worker.wait_until(
            lambda _: any(a["alarm"] == "stalled" for a in alarms(worker)["active"]),
            "the stall alarm raised",
            timeout=30,
        )
        (stall,) = [a for a in alarms(worker)["active"] if a["alarm"] == "stalled"]
        assert stall["partition"] == 0 and stall["lag"] > 0
        assert raised["partitions"]["0"]["seconds_since_progress"] >= 3
        assert "Partition 0 stalled" in worker.log()
        # Stalled for twice SESSIONS_STALL_TIMEOUT: liveness fails, for a restart.
        deadline = time.monotonic() + 30
        while (live := livez(worker))[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert live[0] == 503 and "partition 0 has lag" in live[1]["reason"], live
    finally:
        own_broker.process.send_signal(signal.SIGCONT)
    worker.wait_until(lambda _: alarms(worker)["active"] == [], "the stall alarm cleared", 90)
    assert livez(worker) == (200, {"status": "ok"})
    assert worker.stats()["totals"]["fragments_consumed"] > at_freeze
    states = [(t["alarm"], t["state"]) for t in alarms(worker)["transitions"]]
    assert ("stalled", "raised") in states and ("stalled", "cleared") in states
    # The same two events reach the alerts topic, and nothing of the stream was lost.
    events = [
        json.loads(r.value or b"{}")
        for r in deployment.read_until(
            "alerts",
            lambda rs: sum(json.loads(r.value or b"{}").get("alarm") == "stalled" for r in rs) >= 2,
        )
    ]
    assert [e["state"] for e in events if e["alarm"] == "stalled"] == ["raised", "cleared"]
    assert deployment.verify(sessions).ok


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a disk that fills up."""
    assert os.geteuid() == 0, "mounting a tmpfs needs root, as the test machines have"
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_store_that_refuses_writes_alarms_turns_unready_and_stops_the_worker(
    deployment: Deployment, small_disk: Path
) -> None:
    deployment.env["SESSIONS_STALL_TIMEOUT"] = "3"
    worker = deployment.worker()
    worker.data_dir = small_disk / "data"
    worker.start()
    sessions = generate("disk", 300, 10, b"\r\n", seed=3)
    first, second = sessions[:150], sessions[150:]
    deployment.produce([(k, f, None) for k, f in interleave(first, seed=3)])
    assert deployment.verify(first).ok
    # The disk fills up (another tenant's logs, say): RocksDB's next write fails.
    with (small_disk / "filler").open("wb") as filler:
        try:
            while True:
                filler.write(b"\0" * (1 << 20))
                filler.flush()
        except OSError:
            pass
    deployment.produce([(k, f, None) for k, f in interleave(second, seed=3)])

    status, body = 0, {}
    deadline = time.monotonic() + 30
    while status != 503 and time.monotonic() < deadline:
        status, body = readyz(worker)
        time.sleep(0.1)
    assert status == 503, body
    assert body["reason"].startswith("the session store refuses writes: ")
    assert "No space left on device" in body["reason"]
    (store,) = [a for a in alarms(worker)["active"] if a["alarm"] == "store"]
    assert "No space left on device" in store["cause"]
    # After SESSIONS_STALL_TIMEOUT the worker stops, non-zero, for an orchestrator to act.
    assert worker.process is not None
    assert worker.process.wait(timeout=60) != 0
    assert "Stopping: the session store refuses writes" in worker.log()
    events = [json.loads(r.value or b"{}") for r in deployment.read("alerts", 1)]
    (store_event,) = [e for e in events if e["alarm"] == "store"]
    assert store_event["state"] == "raised" and "No space left" in store_event["cause"]
    # Its partitions had lag and no progress for as long: they were alarmed as stalled too.
    assert {e["alarm"] for e in events} <= {"store", "stalled"}

    # Nothing was lost: a worker on a roomy disk rebuilds from the changelog and goes on.
    shutil.rmtree(worker.data_dir, ignore_errors=True)
    worker.data_dir = deployment.root / "roomy"
    worker.start()
    check = deployment.verify(sessions)
    assert check.ok, check.summary()


TOKEN = "a-token-for-the-census-and-lookup"


def test_census_and_lookup_of_the_sessions_in_the_store(deployment: Deployment) -> None:
    deployment.env["SESSIONS_WEB_TOKEN"] = TOKEN
    worker = deployment.start_worker()
    small = {b"small-%03d" % i: b"x" * 10 for i in range(100)}
    deployment.send_remnants({b"big-one": b"\x00" * 5000})
    worker.wait_until(lambda s: s["live_sessions"] == 1, "the big one applied first")
    deployment.send_remnants(small)
    worker.wait_until(lambda s: s["live_sessions"] == 101, "101 live sessions")

    def census() -> dict[str, Any]:
        return json.loads(worker.get("/census/", token=TOKEN))  # type: ignore[no-any-return]

    report = census()
    assert report["sessions"] == 101
    buckets = {b["bucket"]: b["sessions"] for b in report["by_pending_bytes"]}
    assert (buckets["1-64"], buckets["1025-16384"]) == (100, 1)
    assert sum(buckets.values()) == 101
    assert report["largest"][0] == {"session": "big-one", "pending_bytes": 5000}
    assert report["longest_idle"][0]["session"] == "big-one"  # sent first
    assert sum(b["sessions"] for b in report["by_idle_seconds"]) == 101
    assert census()["taken_at"] == report["taken_at"]  # reused within its interval
    metrics = worker.get("/metrics", token=TOKEN).decode()
    assert re.search(r'^sessions_pending_bytes_bucket{le="64"} 100\.0$', metrics, re.M)
    assert re.search(r'^sessions_pending_bytes_bucket{le="\+Inf"} 101\.0$', metrics, re.M)

    found = json.loads(worker.get("/sessions/lookup?key=big-one", token=TOKEN))
    assert found["owner"] is True
    assert (found["pending_bytes"], found["next_seq"]) == (5000, 1)
    assert found["seconds_idle"] >= 0 and found["applied_offset"] >= 0
    assert "\\u0000" not in json.dumps(found)  # sizes only, never the payload
    hexed = json.loads(worker.get("/sessions/lookup?key_hex=" + b"small-007".hex(), token=TOKEN))
    assert hexed["pending_bytes"] == 10
    assert hexed["partition"] == partition_of(b"small-007", deployment.partitions)
    assert found["partition"] == partition_of(b"big-one", deployment.partitions)

    for path, status in (
        ("/sessions/lookup?key=nobody", 404),
        ("/sessions/lookup?key_hex=zz", 400),
        ("/sessions/lookup", 400),
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            worker.get(path, token=TOKEN)
        err.value.close()
        assert err.value.code == status, path
    for path in ("/census/", "/sessions/lookup?key=big-one"):
        with pytest.raises(urllib.error.HTTPError) as err:
            worker.get(path)
        err.value.close()
        assert err.value.code == 401
