"""Drive real workers and topics from tests and benchmarks: one of each part they share.

A worker process (`WorkerProcess`), a topic reader (`read_topic`), a producer
(`send`, `produce`) and a sender of sessions left with a remnant
(`send_remnants`). The tests' fixtures, the benchmarks and the `verify`
command all read and write through these, so a fix to one reaches all.
Kafka clients are imported when used: importing this module connects to nothing.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sessions_app.tools.embedded_broker import free_port

#: The embedded broker holds each JoinGroup for half the group's session timeout
#: (shared/BROKER.md): a short one makes workers ready in seconds instead of 30.
EMBEDDED_BROKER_ENV = {
    "SESSIONS_BROKER_SESSION_TIMEOUT": "2",
    "SESSIONS_BROKER_HEARTBEAT_INTERVAL": "0.5",
}

#: (key, value, partition) to send; partition None lets the key's partitioner choose.
Item = tuple[bytes | None, bytes | None, int | None]


@dataclass(frozen=True, slots=True)
class Record:
    """A record read back from a topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp: int


def _client(bootstrap: str | Sequence[str], options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Return a Kafka client's connection arguments: the servers, then `options` (TLS, SASL)."""
    servers = bootstrap if isinstance(bootstrap, str) else list(bootstrap)
    return {"bootstrap_servers": servers, **(options or {})}


async def topic_partitions(
    bootstrap: str | Sequence[str], options: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """Return every topic the broker's metadata lists, with its partition count."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(**_client(bootstrap, options))
    await admin.start()
    try:
        # Metadata of all topics: asking for one by name may auto-create it.
        return {t["topic"]: len(t["partitions"]) for t in await admin.describe_topics()}
    finally:
        await admin.close()


async def committed_offsets(
    bootstrap: str | Sequence[str],
    group: str,
    topic: str,
    partitions: int,
    options: Mapping[str, Any] | None = None,
) -> dict[int, int | None]:
    """Return the offset `group` committed for each partition of `topic`, None if none."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    # A member of no group's generation: it only asks the coordinator, it never joins.
    consumer = AIOKafkaConsumer(
        **_client(bootstrap, options), group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {p: await consumer.committed(TopicPartition(topic, p)) for p in range(partitions)}
    finally:
        await consumer.stop()


async def read_topic(
    bootstrap: str | Sequence[str],
    topic: str,
    done: Callable[[list[Record]], bool] = lambda records: True,
    *,
    settle: float = 0.3,
    idle_timeout: float | None = None,
    timeout: float | None = None,
    max_records: int = 10_000,
    options: Mapping[str, Any] | None = None,
) -> list[Record]:
    """Read every partition of `topic` from its start, as no group, committing nothing.

    Stops once `done(records)` holds and no record came for `settle` seconds (records
    still in flight, such as repeats after a crash, are part of the answer); or when no
    record came for `idle_timeout` seconds; or after `timeout` seconds in all. `done`
    sees the whole list after every fetch. `options` are further client arguments, such
    as Settings.kafka_client_options()'s TLS and SASL ones.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(**_client(bootstrap, options), enable_auto_commit=False)
    await consumer.start()
    records: list[Record] = []
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            # Created since the client's first look at the metadata.
            counts = await topic_partitions(bootstrap, options)
            partitions = set(range(counts.get(topic, 0)))
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        began = last_record = time.monotonic()
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=max_records)
            now = time.monotonic()
            for batch in batches.values():
                records += [
                    Record(r.partition, r.offset, r.key, r.value, dict(r.headers), r.timestamp)
                    for r in batch
                ]
                last_record = now
            quiet = now - last_record
            if done(records) and quiet >= settle:
                return records
            if idle_timeout is not None and quiet >= idle_timeout:
                return records
            if timeout is not None and now - began >= timeout:
                return records
    finally:
        await consumer.stop()


async def send(
    bootstrap: str | Sequence[str],
    topic: str,
    items: Iterable[Item],
    *,
    linger_ms: int = 5,
    max_batch_size: int = 512 * 1024,
    wait_every: int = 10_000,
    progress: Callable[[int], None] | None = None,
    options: Mapping[str, Any] | None = None,
) -> float:
    """Send items in order and wait until the broker has them all; return the seconds it took.

    Waits for acknowledgements every `wait_every` records, so a long send holds at most
    that many futures; `progress` is told how many more records are in each time.
    `options` are further client arguments (TLS, SASL).
    """
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        **_client(bootstrap, options), linger_ms=linger_ms, max_batch_size=max_batch_size
    )
    await producer.start()
    began = time.monotonic()
    try:
        pending: list[asyncio.Future[Any]] = []
        for key, value, partition in items:
            pending.append(await producer.send(topic, value, key=key, partition=partition))
            if len(pending) >= wait_every:
                await _acknowledged(pending, progress)
        await _acknowledged(pending, progress)
    finally:
        await producer.stop()
    return time.monotonic() - began


async def _acknowledged(
    pending: list[asyncio.Future[Any]], progress: Callable[[int], None] | None
) -> None:
    await asyncio.gather(*pending)
    if progress is not None:
        progress(len(pending))
    pending.clear()


def produce(bootstrap: str | Sequence[str], topic: str, items: Iterable[Item]) -> float:
    """Send items in order from synchronous code; return the seconds it took."""
    return asyncio.run(send(bootstrap, topic, items))


def remnant_sessions(
    prefix: str, start: int, stop: int, remnant: bytes | None = None
) -> Iterator[tuple[bytes, bytes]]:
    """Yield (session ID, remnant) for sessions start..stop-1; each remnant its own unless given."""
    for n in range(start, stop):
        tail = remnant if remnant is not None else f"remnant {n} \x00\xff".encode()
        yield f"{prefix}-{n:07d}".encode(), tail


async def send_remnants(
    bootstrap: str | Sequence[str],
    topic: str,
    sessions: Iterable[tuple[bytes, bytes]],
    delimiter: bytes,
) -> float:
    """Send one fragment per session: a complete record, then its remnant left pending."""
    items = ((key, b"done" + delimiter + tail, None) for key, tail in sessions)
    return await send(bootstrap, topic, items)


class WorkerProcess:
    """A `sessions-app worker` process with its own data dir, web port and log.

    `env` is read at every start, so a change between a stop and a start applies to
    the next run. The log marks each start, so readiness is read from this run's lines.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        workdir: Path,
        name: str = "worker",
        log_level: str = "info",
        cwd: Path | None = None,
    ) -> None:
        self.env = env
        self.name = name
        self.log_level = log_level
        self.cwd = cwd
        self.web_port = free_port()
        self.data_dir = workdir / f"data-{name}"
        self.log_path = workdir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def web_host(self) -> str:
        """Return the address the worker's web server answers on."""
        host = self.env.get("SESSIONS_WEB_HOST") or "127.0.0.1"
        return "127.0.0.1" if host == "0.0.0.0" else host

    @property
    def pid(self) -> int:
        """Return the running process's id."""
        assert self.process is not None, f"worker {self.name} was never started"
        return self.process.pid

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        """Start the worker and wait until this run has logged "Worker ready"."""
        env = {
            **os.environ,
            **self.env,
            "SESSIONS_DATA_DIR": str(self.data_dir),
            "SESSIONS_WEB_PORT": str(self.web_port),
        }
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {self.starts} ===\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "sessions_app", "worker", "-l", self.log_level],
                env=env,
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.wait_ready(timeout)
        return self

    def current_log(self) -> str:
        """Return what this run of the worker has logged."""
        return self.log().rsplit(f"=== start {self.starts} ===", 1)[-1]

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until this run logged "Worker ready" (its tables recovered, its stream on)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.current_log()
            if "Worker ready" in current:
                return
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{current[-3000:]}")
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} not ready in {timeout}s:\n{self.log()[-3000:]}")

    def get(self, path: str, token: str | None = None, timeout: float = 10.0) -> bytes:
        """Return the body of a GET of `path` on the worker's web server."""
        request = urllib.request.Request(f"http://{self.web_host}:{self.web_port}{path}")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        """Return the worker's /sessions/ report."""
        return json.loads(self.get("/sessions/"))  # type: ignore[no-any-return]

    def wait_until(
        self,
        check: Callable[[dict[str, Any]], bool],
        what: str,
        timeout: float = 60.0,
        poll: float = 0.05,
    ) -> dict[str, Any]:
        """Wait until `check(stats)` holds; return those stats."""
        deadline = time.monotonic() + timeout
        stats: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                stats = self.stats()
                if check(stats):
                    return stats
            except OSError:
                pass  # not listening yet, or busy: ask again
            time.sleep(poll)
        raise TimeoutError(f"never {what}: {stats}\n{self.log()[-3000:]}")

    def wait_for(self, total: str, at_least: int, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until the worker's total named `total` reaches `at_least`; return the stats."""
        return self.wait_until(
            lambda s: s["totals"][total] >= at_least, f"{total} >= {at_least}", timeout
        )

    def kill9(self) -> None:
        """End the worker with SIGKILL: no commit, no flush, no goodbye to the group."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker with SIGTERM (it commits and leaves the group), SIGKILL if it hangs."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        """Return everything the worker has logged, every run."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def errors(self) -> list[str]:
        """Return the ERROR and CRITICAL lines of the worker's log."""
        return [
            line for line in self.log().splitlines() if re.search(r"\[(ERROR|CRITICAL)\]", line)
        ]
