"""Throughput benchmark: sessions-app side by side with the raw client and its peers.

One embedded broker, one pre-produced input (50k sessions of 3 records of
40-160 bytes, each record cut into 1-3 fragments, sessions interleaved), read
in turn by each contender as a process with its own output topic:

  raw          aiokafka consume and produce, each fragment unchanged (the limit)
  dict         the dict design: aiokafka, buffers in a dict (bench/dict_design.py)
  stock-faust  a Faust agent updating a RocksDB table per fragment (bench/stock_faust.py)
  sessions-app a sessions-app worker with its defaults
  sessions-app-40k  the same with SESSIONS_BATCH_FRAGMENTS=40000 (faster, more heap)
  quix         quixstreams with its RocksDB state (bench/peers.py; `pip install -e .[bench]`)

Throughput is fragments per second while the output flows steadily: the
80% of the output between the moments the sink topic held 10% and 90% of it
(its high watermarks, sampled every 50 ms), over that time.
Every contender's output is checked against the input: each session's
records, byte for byte and in order. CPU is the contender process's user +
system seconds per 100k fragments, start-up included.

    .venv/bin/python -m bench.throughput [--sessions 50000] [--only dict,sessions-app] [--rounds 3]

With --rounds N every contender runs N times, in turn, and the medians and
the median of the per-round ratios are printed: on a shared machine one
run's figures move by a fifth.

With --profile DIR, each sessions-app worker runs under py-spy (a bench
extra), which writes DIR/<contender>-r<round>.txt: collapsed stacks per
thread, for flamegraph tools or a grep; the CPU time of each of the worker's
threads is printed. Figures of a profiled run carry py-spy's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT
from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync, free_port
from sessions_app.tools.harness import EMBEDDED_BROKER_ENV, read_topic, send
from sessions_app.tools.loadgen import generate, interleave

PARTITIONS = 4
DELIMITER = b"\r\n"
ESCAPED = "\\r\\n"
CONTENDERS = ["raw", "dict", "stock-faust", "sessions-app", "sessions-app-40k", "quix"]


@dataclass
class Result:
    name: str
    fragments_per_s: float
    cpu_per_100k: float
    output: int
    verdict: str


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads, from /proc."""
    with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_for_output(
    bootstrap: str, topic: str, count: int, alive: Callable[[], bool], timeout: float
) -> list[tuple[float, int]]:
    """Wait until `topic` holds `count` records, reading only its high watermarks.

    Returns (monotonic time, records in the topic) samples, about 50 ms apart.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, max_partition_fetch_bytes=4096
    )
    await consumer.start()
    samples: list[tuple[float, int]] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        # The broker's ListOffsets under-reports (shared/BROKER.md); fetches give the truth.
        ends = dict.fromkeys(tps, 0)
        deadline = time.monotonic() + timeout
        while sum(ends.values()) < count:
            if time.monotonic() > deadline or not alive():
                raise TimeoutError(f"{topic}: {sum(ends.values())} of {count} records")
            for tp in tps:
                consumer.seek(tp, max(0, ends[tp] - 1))
            await consumer.getmany(timeout_ms=100, max_records=PARTITIONS)
            for tp in tps:
                ends[tp] = max(ends[tp], consumer.highwater(tp) or 0)
            samples.append((time.monotonic(), sum(ends.values())))
            await asyncio.sleep(0.05)
    finally:
        await consumer.stop()
    return samples


def steady_rate(samples: list[tuple[float, int]], count: int) -> float:
    """The share of the output produced per second between its 10th and 90th percentile.

    From the topic's growth as sampled: the times it held 10% and 90% of `count`,
    interpolated between samples. Record timestamps would not do: quixstreams gives
    its output the input's timestamps. From the first output record to the last would
    leave out whatever a contender consumed before its first output, which flatters
    designs that work in large batches.
    """

    def reached(share: float) -> float:
        target = count * share
        before = (samples[0][0], 0)
        for at, seen in samples:
            if seen >= target:
                (t0, n0), (t1, n1) = before, (at, seen)
                return t1 if n1 == n0 else t0 + (t1 - t0) * (target - n0) / (n1 - n0)
            before = (at, seen)
        raise ValueError(f"the output never reached {share:.0%} of {count}")

    return 0.8 / (reached(0.9) - reached(0.1))


def read_all(bootstrap: str, topic: str) -> tuple[int, dict[bytes, list[bytes]]]:
    """Every record of `topic`: how many, and the values per key in partition order."""
    records = asyncio.run(read_topic(bootstrap, topic, settle=1.0, max_records=50_000))
    by_key: dict[bytes, list[bytes]] = defaultdict(list)
    for r in records:
        by_key[r.key or b""].append(r.value or b"")
    return len(records), by_key


def thread_cpu_seconds(pid: int) -> list[float]:
    """User + system CPU seconds of each thread of a process, largest first."""
    seconds = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            seconds.append(cpu_seconds(pid, int(task)))
    return sorted(seconds, reverse=True)


def child_pid(pid: int) -> int:
    """The first child of a process (the worker py-spy started)."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return int(children.read().split()[0])


class Bench:
    def __init__(
        self, broker: EmbeddedBroker, workdir: Path, sessions: int, profile: Path | None = None
    ) -> None:
        self.broker, self.workdir, self.profile = broker, workdir, profile
        generated = generate("t", sessions, 3, DELIMITER, seed=6)
        self.items = list(interleave(generated, seed=6))
        self.expected = {s.key: s.records for s in generated}
        self.records = sum(len(r) for r in self.expected.values())
        self.fragments = len(self.items)
        self.by_key_fragments: dict[bytes, list[bytes]] = defaultdict(list)
        for key, fragment in self.items:
            self.by_key_fragments[key].append(fragment)
        create_topics_sync(broker.bootstrap, ["tp-in"], PARTITIONS)
        items = ((key, fragment, None) for key, fragment in self.items)
        asyncio.run(send(broker.bootstrap, "tp-in", items))

    def command(self, name: str, sink: str) -> tuple[list[str], dict[str, str]]:
        py, bootstrap, state = sys.executable, self.broker.bootstrap, self.workdir / sink
        if name == "raw":
            return [py, "-m", "bench.peers", "raw", bootstrap, "tp-in", sink], {}
        if name == "dict":
            progress = str(self.workdir / f"{sink}.progress")
            return [
                py,
                "-m",
                "bench.dict_design",
                bootstrap,
                "tp-in",
                sink,
                progress,
                "1",
                ESCAPED,
            ], {}
        if name == "quix":
            args = ["quix", bootstrap, "tp-in", sink, ESCAPED, str(state), f"bench-{sink}"]
            return [py, "-m", "bench.peers", *args], {}
        if name == "stock-faust":
            env = {
                "STOCK_APP_ID": f"bench-{sink}",
                "STOCK_BROKER_URL": self.broker.url,
                "STOCK_DATA_DIR": str(state),
                "STOCK_PARTITIONS": str(PARTITIONS),
                "STOCK_SOURCE": "tp-in",
                "STOCK_SINK": sink,
                "STOCK_DELIMITER": ESCAPED,
            }
            return [py, "-m", "faust", "-A", "bench.stock_faust", "worker", "-l", "warn"], env
        if name.startswith("sessions-app"):
            env = {
                **EMBEDDED_BROKER_ENV,
                "SESSIONS_APP_ID": f"bench-{sink}",
                "SESSIONS_BROKER_URL": self.broker.url,
                "SESSIONS_DATA_DIR": str(state),
                "SESSIONS_WEB_PORT": str(free_port()),
                "SESSIONS_PARTITIONS": str(PARTITIONS),
                "SESSIONS_INPUT_TOPIC": "tp-in",
                "SESSIONS_OUTPUT_TOPIC": sink,
                "SESSIONS_EXPIRED_TOPIC": f"{sink}-expired",
                "SESSIONS_DLQ_TOPIC": f"{sink}-dlq",
                "SESSIONS_ALERTS_TOPIC": f"{sink}-alerts",
                "SESSIONS_DELIMITER": ESCAPED,
            }
            if name == "sessions-app-40k":
                env["SESSIONS_BATCH_FRAGMENTS"] = "40000"
            return [py, "-m", "sessions_app", "worker", "-l", "warn"], env
        raise ValueError(name)

    def run(self, name: str, round_: int = 1) -> Result:
        sink = f"tp-out-{name}-r{round_}"
        create_topics_sync(
            self.broker.bootstrap,
            [sink]
            + (
                [f"{sink}-{t}" for t in ("expired", "dlq", "alerts")]
                * name.startswith("sessions-app")
            ),
            PARTITIONS,
        )
        command, env = self.command(name, sink)
        profiled = self.profile is not None and name.startswith("sessions-app")
        if profiled:
            assert self.profile is not None
            spy = str(Path(sys.executable).parent / "py-spy")
            output = self.profile / f"{name}-r{round_}.txt"
            options = ["--threads", "--nonblocking", "--rate", "200", "--format", "raw"]
            command = [spy, "record", *options, "--output", str(output), "--", *command]
        want = self.fragments if name == "raw" else self.records
        log = self.workdir / f"{sink}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, env={**os.environ, **env}, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        try:
            samples = asyncio.run(
                wait_for_output(
                    self.broker.bootstrap, sink, want, lambda: process.poll() is None, 1800
                )
            )
            pid = child_pid(process.pid) if profiled else process.pid
            cpu = cpu_seconds(pid)
            if profiled:
                threads = ", ".join(f"{t:.1f}" for t in thread_cpu_seconds(pid) if t >= 0.05)
                print(f"{name}: CPU seconds per thread: {threads}", flush=True)
        except TimeoutError as exc:
            tail = log.read_text(errors="replace")[-2000:]
            return Result(name, 0.0, 0.0, 0, f"FAILED: {exc}\n{tail}")
        finally:
            # py-spy writes its profile when interrupted, and stops the worker.
            process.send_signal(signal.SIGINT if profiled else signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        output, by_key = read_all(self.broker.bootstrap, sink)
        truth = self.by_key_fragments if name == "raw" else self.expected
        wrong = sum(1 for key, values in truth.items() if by_key.get(key) != values)
        extra = set(by_key) - set(truth)
        verdict = (
            "ok" if not wrong and not extra else f"{wrong} sessions differ, {len(extra)} unknown"
        )
        return Result(
            name,
            self.fragments * steady_rate(samples, want),
            cpu / self.fragments * 100_000,
            output,
            verdict,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50_000)
    parser.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    parser.add_argument("--rounds", type=int, default=1, help="run every contender this often")
    parser.add_argument("--profile", type=Path, help="write py-spy profiles of sessions-app here")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(CONTENDERS)
    if unknown:
        parser.error(f"unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    workdir = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    results: list[Result] = []
    try:
        with EmbeddedBroker() as broker:
            if args.profile:
                args.profile.mkdir(parents=True, exist_ok=True)
            bench = Bench(broker, workdir, args.sessions, args.profile)
            print(
                f"input: {bench.fragments:,} fragments, {bench.records:,} records, "
                f"{args.sessions:,} sessions, {PARTITIONS} partitions; {os.cpu_count()} CPUs",
                flush=True,
            )
            for round_ in range(1, args.rounds + 1):
                for name in names:
                    result = bench.run(name, round_)
                    results.append(result)
                    print(
                        f"{name:<17}{result.fragments_per_s:>10,.0f} fragments/s"
                        f"{result.cpu_per_100k:>8.1f} CPU s/100k  {result.output:>9,} out  "
                        f"{result.verdict}",
                        flush=True,
                    )
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir)
    runs: dict[str, list[Result]] = defaultdict(list)
    for result in results:
        runs[result.name].append(result)
    if args.rounds > 1:
        print(f"median of {args.rounds} rounds:")
        for name, of_name in runs.items():
            rate = statistics.median(r.fragments_per_s for r in of_name)
            cpu = statistics.median(r.cpu_per_100k for r in of_name)
            print(f"{name:<17}{rate:>10,.0f} fragments/s{cpu:>8.1f} CPU s/100k")
    for ours in (n for n in runs if n.startswith("sessions-app")):
        for other in (n for n in runs if not n.startswith("sessions-app")):
            # Per round: the two ran minutes apart on the same broker.
            ratios = [
                a.fragments_per_s / b.fragments_per_s
                for a, b in zip(runs[ours], runs[other], strict=True)
                if a.fragments_per_s and b.fragments_per_s
            ]
            if ratios:
                each = ", ".join(f"{r:.2f}" for r in ratios)
                median = statistics.median(ratios)
                print(
                    f"{ours:<16} / {other:<12} {median:6.2f}x" + (f"  ({each})" * (len(ratios) > 1))
                )


if __name__ == "__main__":
    main()
