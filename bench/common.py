"""Shared parts of the benchmarks: their workers, RSS, clients. Not part of the test run.

Workers, topic reading and loading are sessions_app.tools.harness's, as in the tests.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sessions_app.tools.embedded_broker import EmbeddedBroker
from sessions_app.tools.harness import EMBEDDED_BROKER_ENV, WorkerProcess

ROOT = Path(__file__).resolve().parent.parent


def rss_bytes(pid: int) -> int:
    """Return a process's resident set size."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def mib(n: float) -> str:
    return f"{n / 1024 / 1024:,.0f} MiB"


def bench_worker(
    broker: EmbeddedBroker, workdir: Path, name: str = "worker", **env: str
) -> WorkerProcess:
    """Return a sessions-app worker on `broker` for a benchmark, not started."""
    settings = {**EMBEDDED_BROKER_ENV, "SESSIONS_BROKER_URL": broker.url, **env}
    return WorkerProcess(settings, workdir, name, cwd=ROOT)


#: How often the plain contenders commit: Faust's default, which sessions-app keeps.
COMMIT_INTERVAL = 2.8


def passthrough_clients(bootstrap: str, source: str, group: str | None = None) -> tuple[Any, Any]:
    """An unstarted consumer of `source` from its start and a batching producer.

    With `group`, the consumer is that group's member and its owner commits
    (`Committer`): the throughput benchmark's clock is the group's committed offsets.
    """
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        # The embedded broker holds a JoinGroup for half the session timeout.
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
    return consumer, producer


class Committer:
    """Commits a group consumer's positions every COMMIT_INTERVAL, as at-least-once does.

    Call `maybe_commit` only once everything consumed so far is delivered.
    """

    def __init__(self, consumer: Any, enabled: bool) -> None:
        self._consumer, self._enabled = consumer, enabled
        self._last = time.monotonic()

    async def maybe_commit(self) -> None:
        now = time.monotonic()
        if self._enabled and now - self._last >= COMMIT_INTERVAL:
            await self._consumer.commit()
            self._last = now
