"""Shared parts of the benchmarks: their workers, RSS, clients. Not part of the test run.

Workers, topic reading and loading are sessions_app.tools.harness's, as in the tests.
"""

from __future__ import annotations

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


def passthrough_clients(bootstrap: str, source: str) -> tuple[Any, Any]:
    """An unstarted consumer of `source` from its start (no group) and a batching producer."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    consumer = AIOKafkaConsumer(
        source,
        bootstrap_servers=bootstrap,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        max_partition_fetch_bytes=4 * 1024 * 1024,
    )
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, max_batch_size=256 * 1024)
    return consumer, producer
