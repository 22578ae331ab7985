"""Several workers over the partitions: joins, stops and kills mid-stream lose nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sessions_app.tools import harness
from sessions_app.tools.embedded_broker import free_port
from sessions_app.tools.loadgen import Session, generate, interleave

from .conftest import Deployment, Worker, in_phases, records_completed

ROOT = Path(__file__).resolve().parents[2]


class Stream:
    """300 sessions of 20 records, sent in three phases around an event.

    Every session has fragments in the last phase, which is sent only after the event:
    the event happens mid-stream by construction. The second phase is sent just before
    it, so the worker has input in hand when it comes.
    """

    def __init__(self, deployment: Deployment, seed: int) -> None:
        self.deployment = deployment
        self.sessions = generate(f"x{seed}", 300, 20, b"\r\n", seed=seed)
        self.phases = in_phases(self.sessions, 3, seed)

    def until_event(self, workers: list[Worker]) -> None:
        """Send the first phase, wait until half its records are out, send the second."""
        self.deployment.produce(self.phases[0])
        wait_emitted(workers, records_completed(self.phases[0], b"\r\n") // 2)
        self.deployment.produce(self.phases[1])

    def after_event(self) -> None:
        """Send the last phase."""
        self.deployment.produce(self.phases[2])


def emitted(workers: list[Worker]) -> int:
    count = 0
    for worker in workers:
        with contextlib.suppress(OSError):
            count += worker.stats()["totals"]["records_emitted"]
    return count


def wait_emitted(workers: list[Worker], at_least: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while emitted(workers) < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} records emitted"
        time.sleep(0.05)


def assert_all_out(deployment: Deployment, sessions: list[Session], workers: list[Worker]) -> None:
    check = deployment.verify(sessions)
    logs = "\n".join(w.log()[-2000:] for w in workers)
    assert check.ok, check.summary() + "\n" + logs


def test_worker_joins_mid_stream(deployment: Deployment) -> None:
    first = deployment.start_worker("w1")
    stream = Stream(deployment, 21)
    stream.until_event([first])
    second = deployment.start_worker("w2")
    stream.after_event()
    assert_all_out(deployment, stream.sessions, [first, second])
    owned = [len(w.stats()["live_sessions_by_partition"]) for w in (first, second)]
    assert sorted(owned) == [2, 2], owned
    # The worker that joined took its share of what came after it joined.
    assert second.stats()["totals"]["records_emitted"] > 0
    # Each follows the other's partitions as a standby replica, caught up with their changelogs.
    for worker, other in ((first, second), (second, first)):
        theirs = set(other.stats()["live_sessions_by_partition"])
        worker.wait_until(
            lambda s, theirs=theirs: (
                set(s["standbys"]) == theirs
                and all(v["lag"] == 0 and v["applied_offset"] >= 0 for v in s["standbys"].values())
            ),
            f"standbys of {sorted(theirs)} caught up",
            timeout=30,
        )
        metrics = worker.get("/metrics").decode()
        for partition in theirs:
            assert f'sessions_standby_lag{{partition="{partition}"}} 0.0' in metrics


@pytest.mark.parametrize("leave", ["stop", "kill9"])
def test_worker_leaves_mid_stream(deployment: Deployment, leave: str) -> None:
    """A worker stopped (SIGTERM) or killed (SIGKILL) mid-stream: the other takes over."""
    first = deployment.start_worker("w1")
    second = deployment.start_worker("w2")
    stream = Stream(deployment, 22 if leave == "stop" else 23)
    stream.until_event([first, second])
    getattr(second, leave)()
    stream.after_event()
    assert_all_out(deployment, stream.sessions, [first, second])
    assert len(first.stats()["live_sessions_by_partition"]) == 4


def test_missing_topics_are_created_and_a_worker_beyond_the_partitions_idles(
    deployment: Deployment,
) -> None:
    """The worker creates missing topics with SESSIONS_PARTITIONS; a second worker finds none.

    One partition (the broker would give an auto-created topic 4): the first worker
    creates every topic with one, the second joins and owns nothing, and the first
    does all the work.
    """
    for name in ("input", "output", "expired", "dlq", "alerts"):
        deployment.env[f"SESSIONS_{name.upper()}_TOPIC"] = f"{deployment.topic(name)}-new"
    deployment.env["SESSIONS_PARTITIONS"] = "1"
    first = deployment.start_worker("w1")
    topics = asyncio.run(harness.topic_partitions(deployment.broker.bootstrap))
    changelog = f"{deployment.env['SESSIONS_APP_ID']}-session_buffers-changelog"
    names = [deployment.topic(n) for n in ("input", "output", "expired", "dlq", "alerts")]
    assert {name: topics.get(name) for name in [*names, changelog]} == dict.fromkeys(
        [*names, changelog], 1
    )

    second = deployment.start_worker("w2")
    workers = [first, second]

    def owned() -> list[int]:
        return [len(w.stats()["live_sessions_by_partition"]) for w in workers]

    deadline = time.monotonic() + 30
    while sorted(owned()) != [0, 1]:
        assert time.monotonic() < deadline, f"partitions owned: {owned()}"
        time.sleep(0.05)
    busy, idle = workers if owned()[0] else workers[::-1]
    sessions = generate("one", 50, 10, b"\r\n", seed=31)
    deployment.produce([(key, frag, None) for key, frag in interleave(sessions, seed=31)])
    assert_all_out(deployment, sessions, workers)
    stats = idle.stats()
    assert stats["live_sessions_by_partition"] == {}, stats
    assert (stats["totals"]["fragments_consumed"], stats["totals"]["records_emitted"]) == (0, 0)
    assert busy.stats()["totals"]["records_emitted"] == 500


def consecutive_free_ports(count: int) -> int:
    """Return a base port such that base..base+count-1 are all free on 127.0.0.1."""
    for _ in range(50):
        base = free_port()
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise AssertionError(f"no {count} consecutive free ports")


def sessions_stats(port: int) -> dict:  # type: ignore[type-arg]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sessions/", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def test_procfile_runs_two_workers_with_honcho(deployment: Deployment, tmp_path: Path) -> None:
    base = consecutive_free_ports(2)
    env = {
        **os.environ,
        **deployment.env,
        "SESSIONS_DATA_DIR": str(tmp_path / "procfile-data"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    log_path = tmp_path / "honcho.log"
    with log_path.open("wb") as log:
        honcho = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "honcho",
                "-f",
                str(ROOT / "Procfile"),
                "-d",
                str(tmp_path),
                "start",
                "-p",
                str(base),
                "-c",
                "worker=2",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        ports = [base, base + 1]

        def owned() -> list[int]:
            counts = []
            for port in ports:
                try:
                    counts.append(len(sessions_stats(port)["live_sessions_by_partition"]))
                except OSError:
                    counts.append(-1)
            return counts

        deadline = time.monotonic() + 90
        while sorted(owned()) != [2, 2]:
            assert honcho.poll() is None, log_path.read_text(errors="replace")[-4000:]
            assert time.monotonic() < deadline, (
                f"partitions never split: {owned()}\n"
                + log_path.read_text(errors="replace")[-4000:]
            )
            time.sleep(0.2)
        sessions = generate("x24", 300, 20, b"\r\n", seed=24)
        deployment.produce([(key, frag, None) for key, frag in interleave(sessions, seed=24)])
        check = deployment.verify(sessions)
        assert check.ok, check.summary() + "\n" + log_path.read_text(errors="replace")[-4000:]
        # Each worker has its own RocksDB directory under the data dir, named by its port.
        assert sorted(p.name for p in (tmp_path / "procfile-data").iterdir()) == [
            f"worker-{port}" for port in ports
        ]
        emitted_by = [sessions_stats(port)["totals"]["records_emitted"] for port in ports]
        assert all(count > 0 for count in emitted_by), emitted_by
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        try:
            honcho.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait()
