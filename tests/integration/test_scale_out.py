"""Several workers over the partitions: joins, stops and kills mid-stream lose nothing."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from sessions_app.loadgen import Verification, generate, interleave

from .conftest import Deployment, Worker

ROOT = Path(__file__).resolve().parents[2]


def check_output(deployment: Deployment, sessions: list, timeout: float = 120) -> Verification:  # type: ignore[type-arg]
    expected = {s.key: s.records for s in sessions}
    total = sum(len(r) for r in expected.values())
    out = deployment.read("output", total, timeout=timeout)
    check = Verification(expected)
    for record in out:
        check.add(record.key, record.value, record.headers.get("seq"), 0)
    return check


def stream(deployment: Deployment, seed: int) -> tuple[list, int]:  # type: ignore[type-arg]
    sessions = generate(f"x{seed}", 300, 20, b"\r\n", seed=seed)
    total = sum(len(s.records) for s in sessions)
    deployment.produce([(key, frag, None) for key, frag in interleave(sessions, seed=seed)])
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
    check = check_output(deployment, sessions)
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
