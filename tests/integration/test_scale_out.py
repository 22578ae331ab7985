"""Several workers over the partitions: joins, stops and kills mid-stream lose nothing."""

from __future__ import annotations

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

from sessions_app.tools.embedded_broker import free_port
from sessions_app.tools.loadgen import generate, interleave

from .conftest import Deployment, Worker

ROOT = Path(__file__).resolve().parents[2]


def stream(deployment: Deployment, seed: int) -> tuple[list, int]:  # type: ignore[type-arg]
    """Start sending 300 sessions of 20 records over about 8 s; return them and the count."""
    sessions = generate(f"x{seed}", 300, 20, b"\r\n", seed=seed)
    total = sum(len(s.records) for s in sessions)
    items = [(key, frag, None) for key, frag in interleave(sessions, seed=seed)]
    deployment.produce_paced(items, seconds=8)
    return sessions, total


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


def assert_all_out(deployment: Deployment, sessions: list, workers: list[Worker]) -> None:  # type: ignore[type-arg]
    check = deployment.verify(sessions)
    logs = "\n".join(w.log()[-2000:] for w in workers)
    assert check.ok, check.summary() + "\n" + logs


def test_worker_joins_mid_stream(deployment: Deployment) -> None:
    first = deployment.start_worker("w1")
    sessions, total = stream(deployment, 21)
    wait_emitted([first], total // 4)
    second = deployment.start_worker("w2")
    assert_all_out(deployment, sessions, [first, second])
    owned = [len(w.stats()["live_sessions_by_partition"]) for w in (first, second)]
    assert sorted(owned) == [2, 2], owned


@pytest.mark.parametrize("leave", ["stop", "kill9"])
def test_worker_leaves_mid_stream(deployment: Deployment, leave: str) -> None:
    """A worker stopped (SIGTERM) or killed (SIGKILL) mid-stream: the other takes over."""
    first = deployment.start_worker("w1")
    second = deployment.start_worker("w2")
    sessions, total = stream(deployment, 22 if leave == "stop" else 23)
    wait_emitted([first, second], total // 4)
    getattr(second, leave)()
    assert_all_out(deployment, sessions, [first, second])
    assert len(first.stats()["live_sessions_by_partition"]) == 4


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
        sessions, _ = stream(deployment, 24)
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
