"""A real Kafka-protocol broker per test session, and real workers started as processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync, free_port
from sessions_app.tools.loadgen import Session, Verification


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


@dataclass(frozen=True)
class Record:
    """A record read back from a topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]


@dataclass
class Deployment:
    """One app id with its own topics on the shared broker, and the workers running it."""

    broker: EmbeddedBroker
    env: dict[str, str]
    root: Path
    workers: list[Worker] = field(default_factory=list)

    @property
    def partitions(self) -> int:
        return int(self.env["SESSIONS_PARTITIONS"])

    def topic(self, name: str) -> str:
        return self.env[f"SESSIONS_{name.upper()}_TOPIC"]

    def start_worker(self, name: str = "w1") -> Worker:
        worker = Worker(self, name)
        worker.start()
        self.workers.append(worker)
        return worker

    def produce(self, items: list[tuple[bytes | None, bytes | None, int | None]]) -> None:
        """Send (key, value, partition) in order; partition None lets the key choose."""
        asyncio.run(_produce(self.broker.bootstrap, self.topic("input"), items))

    def produce_paced(
        self, items: list[tuple[bytes | None, bytes | None, int | None]], seconds: float
    ) -> threading.Thread:
        """Send items in order, spread over about `seconds`, from a thread; return it running.

        The worker outpaces any single produce call, so a test that stops, kills or adds
        a worker mid-stream needs the stream still flowing when it acts.
        """
        chunks = 20
        size = -(-len(items) // chunks)

        def run() -> None:
            for start in range(0, len(items), size):
                self.produce(items[start : start + size])
                time.sleep(seconds / chunks)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def produce_to(
        self, topic: str, items: list[tuple[bytes | None, bytes | None, int | None]]
    ) -> None:
        asyncio.run(_produce(self.broker.bootstrap, topic, items))

    def read(self, name: str, count: int, timeout: float = 60.0) -> list[Record]:
        """Read topic `name` from the start until `count` records are in (or timeout)."""
        return self.read_until(name, lambda records: len(records) >= count, timeout)

    def read_until(
        self, name: str, done: Callable[[list[Record]], bool], timeout: float = 60.0
    ) -> list[Record]:
        """Read topic `name` from the start until `done(records)` holds (or timeout)."""
        return asyncio.run(_read(self.broker.bootstrap, self.topic(name), done, timeout))

    def verify(self, sessions: list[Session], timeout: float = 120.0) -> Verification:
        """Read the output until every record of `sessions` is in (or timeout); check each.

        Reading stops on completeness, not on a count: repeats after a crash would otherwise
        make a count reached early and leave records unread. Each record is checked once,
        as it is read; `received` counts the output records of these sessions.
        """
        verification = Verification({s.key: s.records for s in sessions})
        checked = 0

        def complete(records: list[Record]) -> bool:
            nonlocal checked
            for record in records[checked:]:
                verification.add(record.key, record.value, record.headers.get("seq"), 0)
            checked = len(records)
            return verification.complete

        # The reader's last look after `complete` held may bring more: check those too.
        complete(self.read_until("output", complete, timeout))
        return verification


class Worker:
    """A `sessions-app worker` process with its own data dir and web port."""

    def __init__(self, deployment: Deployment, name: str) -> None:
        self.deployment = deployment
        self.name = name
        self.web_port = free_port()
        self.data_dir = deployment.root / f"data-{name}"
        self.log_path = deployment.root / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> None:
        env = {
            **os.environ,
            **self.deployment.env,
            "SESSIONS_DATA_DIR": str(self.data_dir),
            "SESSIONS_WEB_PORT": str(self.web_port),
        }
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sessions_app", "worker", "-l", "info"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until this start of the worker logged "Worker ready"."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            current = text.rsplit(f"=== start {self.starts} ===", 1)[-1]
            if "Worker ready" in current:
                return
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{current[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"worker {self.name} not ready in {timeout}s:\n{self.log()[-3000:]}")

    def stats(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.web_port}/sessions/"
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())  # type: ignore[no-any-return]

    def wait_for(self, total: str, at_least: int, timeout: float = 60.0) -> None:
        """Wait until the worker's total named `total` reaches `at_least`."""
        self.wait_until(lambda s: s["totals"][total] >= at_least, f"{total} >= {at_least}", timeout)

    def wait_until(self, check: Any, what: str, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until `check(stats)` holds; return those stats."""
        deadline = time.monotonic() + timeout
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                stats = self.stats()
                if check(stats):
                    return stats
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"never {what}: {stats}\n{self.log()[-3000:]}")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def errors(self) -> list[str]:
        return [
            line for line in self.log().splitlines() if re.search(r"\[(ERROR|CRITICAL)\]", line)
        ]


@pytest.fixture
def deployment(
    broker: EmbeddedBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Deployment]:
    """Fresh topics and app id for one test; workers are stopped afterwards."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:60]
    env = {
        "SESSIONS_BROKER_URL": broker.url,
        "SESSIONS_APP_ID": f"app-{slug}",
        "SESSIONS_PARTITIONS": "4",
        "SESSIONS_INPUT_TOPIC": f"{slug}-chunks",
        "SESSIONS_OUTPUT_TOPIC": f"{slug}-records",
        "SESSIONS_EXPIRED_TOPIC": f"{slug}-expired",
        "SESSIONS_DLQ_TOPIC": f"{slug}-dlq",
        "SESSIONS_ALERTS_TOPIC": f"{slug}-alerts",
        "SESSIONS_DELIMITER": "\\r\\n",
        # The broker's JoinGroup waits half the session timeout (shared/BROKER.md).
        "SESSIONS_BROKER_SESSION_TIMEOUT": "2",
        "SESSIONS_BROKER_HEARTBEAT_INTERVAL": "0.5",
        # The broker under-reports end offsets of multi-record batches; recovery trusts them.
        "SESSIONS_PRODUCER_MAX_BATCH_SIZE": "1",
    }
    for name in ("INPUT", "OUTPUT", "EXPIRED", "DLQ", "ALERTS"):
        create_topics_sync(broker.bootstrap, [env[f"SESSIONS_{name}_TOPIC"]], 4)
    running = Deployment(broker, env, tmp_path)
    yield running
    for worker in running.workers:
        worker.stop()


async def _produce(
    bootstrap: str, topic: str, items: list[tuple[bytes | None, bytes | None, int | None]]
) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, linger_ms=2)
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, partition=partition)
            for key, value, partition in items
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def _read(
    bootstrap: str, topic: str, done: Callable[[list[Record]], bool], timeout: float
) -> list[Record]:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    records: list[Record] = []
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        deadline = time.monotonic() + timeout
        while not done(records) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            for batch in batches.values():
                records += [
                    Record(r.partition, r.offset, r.key, r.value, dict(r.headers)) for r in batch
                ]
        # Anything beyond what `done` needed that is already there is part of the answer too.
        batches = await consumer.getmany(timeout_ms=300)
        for batch in batches.values():
            records += [
                Record(r.partition, r.offset, r.key, r.value, dict(r.headers)) for r in batch
            ]
    finally:
        await consumer.stop()
    return records
