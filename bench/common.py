"""Shared parts of the benchmarks: broker, topics, loading, RSS. Not part of the test run."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync, free_port

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


class Worker:
    """A sessions-app worker process for a benchmark."""

    def __init__(self, broker: EmbeddedBroker, workdir: Path, **env: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.web_port = free_port()
        self.log = workdir / "worker.log"
        self.env = {
            **os.environ,
            "SESSIONS_BROKER_URL": broker.url,
            "SESSIONS_DATA_DIR": str(workdir / "data"),
            "SESSIONS_WEB_PORT": str(self.web_port),
            "SESSIONS_BROKER_SESSION_TIMEOUT": "2",
            "SESSIONS_BROKER_HEARTBEAT_INTERVAL": "0.5",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Worker:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sessions_app", "worker", "-l", "warn"],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                self.stats()
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"worker did not start; see {self.log}")

    def stats(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.web_port}/sessions/"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def wait(self, check: Any, timeout: float = 3600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                stats = self.stats()
                if check(stats):
                    return stats
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("benchmark step did not finish")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


async def send_all(bootstrap: str, topic: str, items: Iterable[tuple[bytes, bytes]]) -> float:
    """Send (key, value) items in order, waiting every 20,000; return the seconds it took."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024
    )
    await producer.start()
    began = time.monotonic()
    try:
        pending = []
        for key, value in items:
            pending.append(await producer.send(topic, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return time.monotonic() - began


async def send_remnants(
    bootstrap: str, topic: str, prefix: str, start: int, stop: int, remnant: bytes
) -> float:
    """Send one fragment per session start..stop, each a record plus an unfinished remnant."""
    items = ((f"{prefix}{n:010d}".encode(), b"record\n" + remnant) for n in range(start, stop))
    return await send_all(bootstrap, topic, items)


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


async def read_topic(bootstrap: str, topic: str, partitions: int) -> list[Any]:
    """Every record of `topic` from the start, in order per partition, until it goes quiet."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    out: list[Any] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        idle = 0
        while idle < 5:
            batches = await consumer.getmany(timeout_ms=200, max_records=50_000)
            idle = 0 if batches else idle + 1
            for records in batches.values():
                out += records
    finally:
        await consumer.stop()
    return out


__all__ = ["EmbeddedBroker", "create_topics_sync", "free_port"]
