"""A real Kafka-protocol broker per test session, and real workers started as processes."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiokafka.partitioner import DefaultPartitioner

from sessions_app.tools import harness
from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync
from sessions_app.tools.harness import Item, Record, WorkerProcess
from sessions_app.tools.loadgen import Session, Verification, interleave, verify

__all__ = [
    "Deployment",
    "Record",
    "Worker",
    "in_phases",
    "large_sessions",
    "partition_of",
    "records_completed",
]

#: The tests' workers; the harness's, under the name the tests use.
Worker = WorkerProcess


def partition_of(key: bytes, partitions: int) -> int:
    """Return the partition Kafka's default partitioner picks for `key`."""
    return int(DefaultPartitioner()(key, list(range(partitions)), list(range(partitions))))


def in_phases(sessions: list[Session], phases: int, seed: int) -> list[list[Item]]:
    """Cut every session's fragments into `phases` runs; phase i interleaves the i-th runs.

    Every session has fragments in every phase, so a test that acts between two phases
    acts while every session is open, whatever the timing.
    """
    parts: list[list[Session]] = [[] for _ in range(phases)]
    for session in sessions:
        size = len(session.fragments)
        assert size >= phases, f"{session.key!r} has fewer fragments than phases"
        bounds = [size * i // phases for i in range(phases + 1)]
        for i in range(phases):
            run = session.fragments[bounds[i] : bounds[i + 1]]
            parts[i].append(Session(session.key, [], run))
    return [[(key, frag, None) for key, frag in interleave(part, seed)] for part in parts]


def large_sessions(count: int, sizes: list[int], seed: int) -> list[Session]:
    """Sessions of records of the given sizes, cut into fragments of about 1 KiB.

    The cuts fall anywhere, between the delimiter's two bytes too, and some records
    are 1 byte: the smallest beside the largest.
    """
    rng = random.Random(seed)
    sessions = []
    for n in range(count):
        records = [
            bytes(rng.choice(b"abcdefgh\r") for _ in range(size)).replace(b"\r", b"x")
            for size in (*sizes, 1)
        ]
        stream = b"".join(record + b"\r\n" for record in records)
        cuts = sorted({rng.randrange(1, len(stream)) for _ in range(len(stream) // 1024)})
        # A cut between \r and \n of every record's delimiter but the last.
        cuts = sorted(set(cuts) | {stream.index(b"\r\n") + 1})
        bounds = [0, *cuts, len(stream)]
        fragments = [stream[a:b] for a, b in itertools.pairwise(bounds)]
        sessions.append(Session(f"big-{seed}-{n}".encode(), records, fragments))
    return sessions


def records_completed(items: list[Item], delimiter: bytes) -> int:
    """Return how many records `items` complete when they are the first a session gets."""
    sent: dict[bytes | None, list[bytes]] = {}
    for key, value, _ in items:
        sent.setdefault(key, []).append(value or b"")
    return sum(b"".join(values).count(delimiter) for values in sent.values())


def last_offsets(items: list[Item], partitions: int) -> dict[int, int]:
    """Return the last offset `items` get in each partition of a topic they start."""
    counts: dict[int, int] = {}
    for key, _, partition in items:
        where = partition if partition is not None else partition_of(key or b"", partitions)
        counts[where] = counts.get(where, 0) + 1
    return {partition: count - 1 for partition, count in counts.items()}


@pytest.fixture(scope="session")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as running:
        yield running


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

    @property
    def delimiter(self) -> bytes:
        """Return the delimiter the workers are configured with, as bytes."""
        from sessions_app.settings import parse_delimiter

        return parse_delimiter("SESSIONS_DELIMITER", self.env.get("SESSIONS_DELIMITER", "\\n"))

    def topic(self, name: str) -> str:
        return self.env[f"SESSIONS_{name.upper()}_TOPIC"]

    def worker(self, name: str = "w1") -> Worker:
        """Return a worker of this deployment, not started; it is stopped after the test."""
        worker = WorkerProcess(self.env, self.root, name)
        self.workers.append(worker)
        return worker

    def start_worker(self, name: str = "w1") -> Worker:
        return self.worker(name).start()

    def produce(self, items: Iterable[Item]) -> None:
        """Send (key, value, partition) in order; partition None lets the key choose."""
        harness.produce(self.broker.bootstrap, self.topic("input"), items)

    def produce_to(self, topic: str, items: Iterable[Item]) -> None:
        harness.produce(self.broker.bootstrap, topic, items)

    def send_remnants(self, sessions: dict[bytes, bytes]) -> None:
        """Send each session a complete record followed by its remnant, left pending."""
        asyncio.run(
            harness.send_remnants(
                self.broker.bootstrap, self.topic("input"), sessions.items(), self.delimiter
            )
        )

    def read(self, name: str, count: int, timeout: float = 60.0) -> list[Record]:
        """Read topic `name` from the start until `count` records are in (or timeout)."""
        return self.read_until(name, lambda records: len(records) >= count, timeout)

    def read_until(
        self, name: str, done: Callable[[list[Record]], bool], timeout: float = 60.0
    ) -> list[Record]:
        """Read topic `name` from the start until `done(records)` holds (or timeout)."""
        return asyncio.run(
            harness.read_topic(self.broker.bootstrap, self.topic(name), done, timeout=timeout)
        )

    def wait_applied(self, worker: Worker, sent: list[Item], timeout: float = 60.0) -> None:
        """Wait until `worker` has applied up to the last input offset of `sent` in each partition.

        `sent` is all this test sent. Exact where a count of fragments is not (replays of
        uncommitted fragments after a restart count too); a gap below it is for the
        test's byte-for-byte check to find.
        """
        last = {str(p): offset for p, offset in last_offsets(sent, self.partitions).items()}
        worker.wait_until(
            lambda s: all(
                s["partitions"].get(p, {}).get("applied_offset", -1) >= offset
                for p, offset in last.items()
            ),
            f"input offsets applied up to {last}",
            timeout,
        )

    def verify(self, sessions: list[Session], timeout: float = 60.0) -> Verification:
        """Read the output until every record of `sessions` is in; check each as it comes.

        Reading stops on completeness, not on a count: repeats after a crash would otherwise
        make a count reached early and leave records unread. Gives up once no record came
        for `timeout` seconds.
        """
        check = Verification({s.key: s.records for s in sessions})
        return asyncio.run(
            verify([self.broker.bootstrap], self.topic("output"), check, timeout, settle=0.3)
        )


@pytest.fixture
def deployment(
    broker: EmbeddedBroker, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Deployment]:
    """Fresh topics and app id for one test; workers are stopped afterwards."""
    # Short enough for topic names, unique per test and parameter (the hash tells apart
    # names that share their first 50 characters).
    name = request.node.name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:50] + "-" + digest
    env = {
        **harness.EMBEDDED_BROKER_ENV,
        "SESSIONS_BROKER_URL": broker.url,
        "SESSIONS_APP_ID": f"app-{slug}",
        "SESSIONS_PARTITIONS": "4",
        "SESSIONS_INPUT_TOPIC": f"{slug}-chunks",
        "SESSIONS_OUTPUT_TOPIC": f"{slug}-records",
        "SESSIONS_EXPIRED_TOPIC": f"{slug}-expired",
        "SESSIONS_DLQ_TOPIC": f"{slug}-dlq",
        "SESSIONS_ALERTS_TOPIC": f"{slug}-alerts",
        "SESSIONS_DELIMITER": "\\r\\n",
        # The broker under-reports end offsets of multi-record batches; recovery trusts them.
        "SESSIONS_PRODUCER_MAX_BATCH_SIZE": "1",
    }
    for name in ("INPUT", "OUTPUT", "EXPIRED", "DLQ", "ALERTS"):
        create_topics_sync(broker.bootstrap, [env[f"SESSIONS_{name}_TOPIC"]], 4)
    running = Deployment(broker, env, tmp_path)
    yield running
    for worker in running.workers:
        worker.stop()
