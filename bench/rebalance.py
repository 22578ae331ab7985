"""Rebalance benchmark: how long partitions pause when a worker joins, stops or dies.

Two sessions-app workers over 4 partitions on the embedded broker, with a
steady stream of input (complete records over 1,000 sessions). While it
flows, a second worker joins, is stopped with SIGTERM, joins again and is
killed with SIGKILL. For each event it prints how long until the partitions
were owned again as they should be (from /sessions/ of each worker, polled
every 20 ms), and the longest pause in output on any partition after the
event (from the output records' timestamps, stamped by the worker's producer
when it sends). Input runs at a steady rate, so a pause is time a partition
spent unprocessed. Before each event it also prints the largest lag of the
standby replicas (changelog records not yet applied, from /sessions/).

`--preload N` first gives the first worker N idle sessions, each holding a
64-byte tail, so the partitions that move carry state: a joining worker
rebuilds its share from the changelog (with an empty disk the first time),
and a killed one's partitions are taken over from the survivor's standbys.

    .venv/bin/python -m bench.rebalance [--rate 2000] [--settle 6] [--rounds 3] [--preload N]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import signal
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

from bench.common import bench_worker
from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync
from sessions_app.tools.harness import WorkerProcess, read_topic, remnant_sessions, send_remnants

PARTITIONS = 4
EVENTS = ("join", "stop", "join", "kill -9")
SESSIONS = 1000


class SteadyProducer(threading.Thread):
    """Sends complete records at a fixed rate until stopped."""

    def __init__(self, bootstrap: str, topic: str, rate: int) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.rate = bootstrap, topic, rate
        self.halt = threading.Event()
        self.sent = 0

    def run(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        from aiokafka import AIOKafkaProducer

        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, linger_ms=5)
        await producer.start()
        began = time.monotonic()
        try:
            while not self.halt.is_set():
                due = int((time.monotonic() - began) * self.rate)
                for n in range(self.sent, due):
                    key = f"s{n % SESSIONS:05d}".encode()
                    await producer.send(self.topic, b"record %d\r\n" % n, key=key)
                self.sent = max(self.sent, due)
                await asyncio.sleep(0.01)
            await producer.flush()
        finally:
            await producer.stop()


def standby_lag(workers: list[WorkerProcess]) -> int | None:
    """Return the largest lag of any running worker's standby replicas, None if none has one."""
    lags: list[int] = []
    for worker in workers:
        if worker.process is None or worker.process.poll() is not None:
            continue
        try:
            standbys = worker.stats()["standbys"].values()
        except OSError:
            continue
        lags += [v["lag"] for v in standbys if v["lag"] is not None]
    return max(lags) if lags else None


def owned(workers: list[WorkerProcess]) -> list[int]:
    counts = []
    for worker in workers:
        try:
            counts.append(len(worker.stats()["live_sessions_by_partition"]))
        except OSError:
            counts.append(0)
    return counts


def wait_owned(workers: list[WorkerProcess], want: list[int], timeout: float = 120) -> float:
    """Poll until the workers own `want` partitions each; return when, monotonic."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sorted(owned(workers)) == sorted(want):
            return time.monotonic()
        time.sleep(0.02)
    raise TimeoutError(f"partitions never settled as {want}: {owned(workers)}")


def read_output(bootstrap: str, topic: str) -> tuple[dict[int, list[float]], set[bytes]]:
    """Read `topic` from the start: each partition's record timestamps (s), distinct values."""
    times: dict[int, list[float]] = defaultdict(list)
    values: set[bytes] = set()
    for r in asyncio.run(read_topic(bootstrap, topic, settle=1.0)):
        times[r.partition].append(r.timestamp / 1000)
        if r.value is not None:
            values.add(r.value)
    return times, values


def longest_pause(times: dict[int, list[float]], start: float, end: float) -> float:
    """The longest gap between consecutive outputs of one partition within [start, end]."""
    worst = 0.0
    for stamps in times.values():
        window = [start] + [t for t in sorted(stamps) if start <= t <= end]
        worst = max([worst, *(b - a for a, b in itertools.pairwise(window))])
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=int, default=2000, help="input records per second")
    parser.add_argument("--settle", type=float, default=6, help="seconds between events")
    parser.add_argument("--rounds", type=int, default=3, help="times to repeat the four events")
    parser.add_argument("--preload", type=int, default=0, help="idle sessions held before")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-rebalance-"))
    topics = {
        name: f"rb-{name.lower()}" for name in ("INPUT", "OUTPUT", "EXPIRED", "DLQ", "ALERTS")
    }
    with EmbeddedBroker() as broker:
        create_topics_sync(broker.bootstrap, list(topics.values()), PARTITIONS)
        env = {f"SESSIONS_{name}_TOPIC": topic for name, topic in topics.items()}
        env |= {
            "SESSIONS_APP_ID": "bench-rebalance",
            "SESSIONS_PARTITIONS": str(PARTITIONS),
            "SESSIONS_DELIMITER": "\\r\\n",
            # The broker under-reports end offsets of multi-record batches (shared/BROKER.md).
            "SESSIONS_PRODUCER_MAX_BATCH_SIZE": "1",
        }
        if args.preload:
            # The preloaded sessions stay put: what moves with their partitions is measured.
            env["SESSIONS_IDLE_TIMEOUT"] = str(86400)
        first = bench_worker(broker, workdir, name="w1", **env).start()
        second = bench_worker(broker, workdir, name="w2", **env)
        wait_owned([first], [4])
        if args.preload:
            idle = remnant_sessions("pre", 0, args.preload, b"t" * 64)
            asyncio.run(send_remnants(broker.bootstrap, topics["INPUT"], idle, b"\r\n"))
            first.wait_until(
                lambda s: s["totals"]["fragments_consumed"] >= args.preload,
                f"{args.preload:,} sessions preloaded",
                timeout=3600,
                poll=1.0,
            )
        producer = SteadyProducer(broker.bootstrap, topics["INPUT"], args.rate)
        producer.start()
        events: list[tuple[str, float, float, int | None]] = []
        try:
            time.sleep(args.settle)
            for event in EVENTS * args.rounds:
                lag = standby_lag([first, second])
                began = time.time()
                t0 = time.monotonic()
                if event.startswith("join"):
                    second.start()
                    settled = wait_owned([first, second], [2, 2])
                else:
                    assert second.process is not None
                    second.process.send_signal(
                        signal.SIGTERM if event == "stop" else signal.SIGKILL
                    )
                    settled = wait_owned([first], [4])
                    second.process.wait()
                events.append((event, began, settled - t0, lag))
                time.sleep(args.settle)
        finally:
            producer.halt.set()
            producer.join()
            deadline = time.monotonic() + 120
            while True:
                times, values = read_output(broker.bootstrap, topics["OUTPUT"])
                if len(values) >= producer.sent or time.monotonic() > deadline:
                    break
                time.sleep(2)
            second.stop()
            first.stop()
    print(
        f"input: {args.rate} records/s over {SESSIONS} sessions, {PARTITIONS} partitions, "
        f"{args.preload:,} idle sessions preloaded"
    )
    out = sum(map(len, times.values()))
    print(f"sent {producer.sent:,} records; out {out:,}, {len(values):,} distinct")
    print(
        f"{'event':<12}{'partitions settled':>20}{'longest output pause':>24}"
        f"{'standby lag before':>20}"
    )
    for event, began, settled, lag in events:
        pause = longest_pause(times, began, began + args.settle)
        shown = "-" if lag is None else f"{lag:,}"
        print(f"{event:<12}{settled:>19.2f}s{pause:>23.2f}s{shown:>20}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
