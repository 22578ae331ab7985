"""Throughput benchmark: sessions-app side by side with the raw client and its peers.

One input (by default 50k sessions of 10 records of 40-160 bytes, each
record cut into 1-3 fragments: about 1.1M fragments, sessions interleaved),
read in turn by each contender as a process (or two) with its own consumer
group and output topic, each on a fresh embedded broker loaded with the
input first (the broker keeps every record in memory and slows as it
holds more: on a shared one, a contender paid for those that ran before it):

  raw          aiokafka consume and produce, each fragment unchanged (the limit)
  dict         the dict design: aiokafka, buffers in a dict (bench/dict_design.py)
  stock-faust  a Faust agent updating a RocksDB table per fragment (bench/stock_faust.py)
  sessions-app a sessions-app worker with its defaults
  sessions-app-40k  the same with SESSIONS_BATCH_FRAGMENTS=40000 (faster, more heap)
  sessions-app-2w   two sessions-app workers (the Procfile's way to use more cores)
  quix         quixstreams with its RocksDB state (bench/peers.py; `pip install -e .[bench]`)

The clock is each contender's consumer group's committed input offsets,
read by one long-lived consumer in the benchmark every 50 ms: exact, and
free for the contenders, which commit anyway (raw and dict commit every
2.8 s, Faust's default, once what they consumed is delivered; quixstreams
every 5 s, its default). Throughput is the input committed between the
group's first commit step and its last step before the one that completes
the input, over that time: start-up, the wait for the first commit and the
idle time before the last one don't count, and every contender was busy
all along. Every contender's output is checked against the input: each
session's records, byte for byte and in order. CPU is the contender's user
+ system seconds per 100k fragments, start-up included; and inside the
clock's window alone, per thread group, beside the broker's CPU per 100k
fragments and how busy the machine's CPUs were (from /proc/stat): a
contender that gets less of the machine than another shows it there.

    .venv/bin/python -m bench.throughput [--sessions 50000] [--only dict,sessions-app] [--rounds 3]

With --rounds N every contender runs N times, in turn; the median, the
spread ((max - min) / median) of each contender, and the per-round ratios
are printed: on a shared machine one run's figures move.

With --profile DIR, each sessions-app worker runs under py-spy (a bench
extra), which writes DIR/<contender>-r<round>-w<worker>.txt: collapsed stacks per
thread, for `python -m bench.breakdown` or a flamegraph tool; the CPU time
of each of the worker's threads is printed. Figures of a profiled run carry
py-spy's overhead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.breakdown import breakdown, report
from bench.common import ROOT
from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync, free_port
from sessions_app.tools.harness import EMBEDDED_BROKER_ENV, read_topic, send
from sessions_app.tools.loadgen import generate, interleave

PARTITIONS = 4
DELIMITER = b"\r\n"
ESCAPED = "\\r\\n"
CONTENDERS = [
    "raw",
    "dict",
    "stock-faust",
    "sessions-app",
    "sessions-app-40k",
    "sessions-app-2w",
    "quix",
]
#: How often the clock reads the committed offsets.
CLOCK_PERIOD = 0.05


@dataclass
class Result:
    name: str
    fragments_per_s: float
    cpu_per_100k: float
    output: int
    verdict: str
    #: CPU seconds per 100k fragments inside the clock's window alone, per thread group.
    window_cpu: dict[str, float] = field(default_factory=dict)
    #: How busy the machine's CPUs were in the clock's window, 1.0 = all of them.
    machine_busy: float = float("nan")

    @property
    def window_cpu_per_100k(self) -> float:
        """The contender's own CPU in the window: its thread groups, not the machine's."""
        own = [c for g, c in self.window_cpu.items() if g not in BESIDE]
        return sum(own) if own else float("nan")


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU seconds of a process, or of one of its threads, from /proc."""
    with open(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


#: Groups of a sample's CPU that are not the contender's: the broker's process, and
#: every CPU of the machine (busy seconds, whoever used them, steal time included).
BESIDE = ("broker", "machine")


def machine_busy_seconds() -> float:
    """Busy CPU seconds of the whole machine since boot, all CPUs, from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(f) for f in stat.readline().split()[1:]]
    idle, iowait = fields[3], fields[4]
    return (sum(fields[:8]) - idle - iowait) / os.sysconf("SC_CLK_TCK")


def thread_groups(pid: int) -> dict[str, float]:
    """CPU seconds of a process's threads: its main thread, RocksDB's, and the others.

    RocksDB's own threads flush and compact; the pipeline's writes run in asyncio's
    executor threads, among the others with aiokafka's consumer thread.
    """
    groups = {"main": 0.0, "rocksdb": 0.0, "other": 0.0}
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            with open(f"/proc/{pid}/task/{task}/comm") as comm:
                name = comm.read()
            group = (
                "main" if int(task) == pid else "rocksdb" if name.startswith("rocksdb") else "other"
            )
            groups[group] += cpu_seconds(pid, int(task))
    return groups


#: (monotonic time, offsets committed over all partitions, CPU seconds: the contender's
#: per thread group, the broker's, and the machine's busy seconds).
Sample = tuple[float, int, dict[str, float]]


async def watch_commits(
    bootstrap: str,
    group: str,
    topic: str,
    total: int,
    alive: Callable[[], bool],
    timeout: float,
    cpu: Callable[[], dict[str, float]],
) -> list[Sample]:
    """Read `group`'s committed offsets of `topic` until they cover `total` records.

    Returns samples CLOCK_PERIOD apart. One consumer, which never joins the group,
    asks the coordinator, and `cpu` reads /proc: it costs the contender nothing.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    samples: list[Sample] = []
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        deadline = time.monotonic() + timeout
        while not samples or samples[-1][1] < total:
            if time.monotonic() > deadline or not alive():
                raise TimeoutError(f"{group}: {samples[-1][1] if samples else 0} of {total}")
            committed = sum([await consumer.committed(tp) or 0 for tp in tps])
            samples.append((time.monotonic(), committed, cpu()))
            await asyncio.sleep(CLOCK_PERIOD)
    finally:
        await consumer.stop()
    return samples


def commit_window(samples: list[Sample]) -> tuple[Sample, Sample]:
    """Return the samples of the first commit step and of the last before the final one.

    A step is a sample whose committed total is higher than the one before. The
    final step may come up to a commit interval after the contender ran out of
    input, so the window ends at the step before it: the contender was busy
    throughout.
    """
    steps = [after for before, after in itertools.pairwise(samples) if after[1] > before[1]]
    if len(steps) < 3:
        raise ValueError(f"only {len(steps)} commit steps: give the contender more input")
    return steps[0], steps[-2]


def commit_rate(samples: list[Sample]) -> float:
    """Records per second in the commit window."""
    (t0, n0, _), (t1, n1, _) = commit_window(samples)
    return (n1 - n0) / (t1 - t0)


def window_cpu(samples: list[Sample]) -> dict[str, float]:
    """The contender's CPU seconds per 100k records in the commit window, per thread group.

    Against the rate's, its spread across rounds tells the contender's own variation
    (more work per record) from the machine's (less CPU to be had, or slower).
    """
    (_, n0, c0), (_, n1, c1) = commit_window(samples)
    return {group: (c1[group] - c0.get(group, 0.0)) / (n1 - n0) * 100_000 for group in c1}


def machine_busy(samples: list[Sample]) -> float:
    """The share of the machine's CPUs that were busy in the commit window, by anyone."""
    (t0, _, c0), (t1, _, c1) = commit_window(samples)
    return (c1["machine"] - c0["machine"]) / (t1 - t0) / (os.cpu_count() or 1)


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
        self, workdir: Path, sessions: int, records: int, profile: Path | None = None
    ) -> None:
        self.workdir, self.profile = workdir, profile
        generated = generate("t", sessions, records, DELIMITER, seed=6)
        self.items = list(interleave(generated, seed=6))
        self.expected = {s.key: s.records for s in generated}
        self.records = sum(len(r) for r in self.expected.values())
        self.fragments = len(self.items)
        self.by_key_fragments: dict[bytes, list[bytes]] = defaultdict(list)
        for key, fragment in self.items:
            self.by_key_fragments[key].append(fragment)
        self.broker: EmbeddedBroker | None = None

    def run(self, name: str, round_: int = 1) -> Result:
        """Run a contender on a broker of its own, with the input loaded first.

        The embedded broker slows as it holds more (it keeps every record in
        memory), and contenders that write more (changelogs) leave more behind:
        a shared broker would make every contender pay for the ones before it.
        """
        with EmbeddedBroker() as broker:
            self.broker = broker
            create_topics_sync(broker.bootstrap, ["tp-in"], PARTITIONS)
            items = ((key, fragment, None) for key, fragment in self.items)
            asyncio.run(send(broker.bootstrap, "tp-in", items))
            try:
                return self._run(name, round_)
            finally:
                self.broker = None

    def command(self, name: str, sink: str) -> tuple[list[str], dict[str, str]]:
        assert self.broker is not None
        py, bootstrap, state = sys.executable, self.broker.bootstrap, self.workdir / sink
        group = f"bench-{sink}"
        if name == "raw":
            return [py, "-m", "bench.peers", "raw", bootstrap, "tp-in", sink, group], {}
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
                group,
            ], {}
        if name == "quix":
            args = ["quix", bootstrap, "tp-in", sink, ESCAPED, str(state), group]
            return [py, "-m", "bench.peers", *args], {}
        if name == "stock-faust":
            env = {
                "STOCK_APP_ID": group,
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
                "SESSIONS_APP_ID": group,
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

    def _run(self, name: str, round_: int) -> Result:
        assert self.broker is not None
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
        processes = []
        for worker in range(2 if name == "sessions-app-2w" else 1):
            argv, worker_env = command, dict(env)
            if worker:  # the second worker: its own web port and disk, as in the Procfile
                worker_env["SESSIONS_WEB_PORT"] = str(free_port())
                worker_env["SESSIONS_DATA_DIR"] = f"{env['SESSIONS_DATA_DIR']}-w{worker + 1}"
            if profiled:
                assert self.profile is not None
                spy = str(Path(sys.executable).parent / "py-spy")
                written = self.profile / f"{name}-r{round_}-w{worker + 1}.txt"
                options = ["--threads", "--nonblocking", "--rate", "200", "--format", "raw"]
                argv = [spy, "record", *options, "--output", str(written), "--", *command]
            log = self.workdir / f"{sink}-w{worker + 1}.log"
            with log.open("wb") as out:
                processes.append(
                    subprocess.Popen(
                        argv,
                        env={**os.environ, **worker_env},
                        cwd=ROOT,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )

        broker = self.broker.process
        assert broker is not None

        def contender_cpu() -> dict[str, float]:
            sample = {"machine": machine_busy_seconds()}
            with contextlib.suppress(OSError):  # a broker that is gone fails the run anyway
                sample["broker"] = cpu_seconds(broker.pid)
            total: Counter[str] = Counter()
            try:
                for process in processes:
                    total.update(thread_groups(child_pid(process.pid) if profiled else process.pid))
            except (OSError, IndexError, ValueError):  # not started yet, or gone
                return sample
            return {**total, **sample}

        try:
            samples = asyncio.run(
                watch_commits(
                    self.broker.bootstrap,
                    f"bench-{sink}",
                    "tp-in",
                    self.fragments,
                    lambda: all(p.poll() is None for p in processes),
                    1800,
                    contender_cpu,
                )
            )
            pids = [child_pid(p.pid) if profiled else p.pid for p in processes]
            cpu = sum(cpu_seconds(pid) for pid in pids)
            if profiled:
                for pid in pids:
                    threads = ", ".join(f"{t:.1f}" for t in thread_cpu_seconds(pid) if t >= 0.05)
                    print(f"{name}: CPU seconds per thread: {threads}", flush=True)
        except TimeoutError as exc:
            tail = (self.workdir / f"{sink}-w1.log").read_text(errors="replace")[-2000:]
            return Result(name, 0.0, 0.0, 0, f"FAILED: {exc}\n{tail}")
        finally:
            for process in processes:
                # py-spy writes its profile when interrupted, and stops the worker.
                process.send_signal(signal.SIGINT if profiled else signal.SIGTERM)
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        if profiled:
            assert self.profile is not None
            profiles = [self.profile / f"{name}-r{round_}-w{w + 1}.txt" for w in range(len(pids))]
            steps = sum((breakdown(path) for path in profiles if path.exists()), Counter())
            print(report(steps, cpu / self.fragments * 1_000_000), flush=True)
        output, by_key = read_all(self.broker.bootstrap, sink)
        truth = self.by_key_fragments if name == "raw" else self.expected
        wrong = sum(1 for key, values in truth.items() if by_key.get(key) != values)
        extra = set(by_key) - set(truth)
        verdict = (
            "ok" if not wrong and not extra else f"{wrong} sessions differ, {len(extra)} unknown"
        )
        try:
            rate = commit_rate(samples)
        except ValueError as exc:
            return Result(name, 0.0, cpu / self.fragments * 100_000, output, f"FAILED: {exc}")
        return Result(
            name,
            rate,
            cpu / self.fragments * 100_000,
            output,
            verdict,
            window_cpu(samples),
            machine_busy(samples),
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=50_000)
    parser.add_argument("--records", type=int, default=10, help="records per session")
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
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
        bench = Bench(workdir, args.sessions, args.records, args.profile)
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
                    f"{result.cpu_per_100k:>8.1f} CPU s/100k"
                    f" ({result.window_cpu_per_100k:.2f} in the window: "
                    + ", ".join(
                        f"{g} {c:.2f}" for g, c in result.window_cpu.items() if g not in BESIDE
                    )
                    + f"; broker {result.window_cpu.get('broker', float('nan')):.2f},"
                    f" machine busy {result.machine_busy:.0%})  {result.output:>9,} out  "
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
        print(f"median of {args.rounds} rounds, spread = (max - min) / median:")
        for name, of_name in runs.items():
            rates = [r.fragments_per_s for r in of_name]
            rate = statistics.median(rates)
            cpu = statistics.median(r.cpu_per_100k for r in of_name)
            spread = (max(rates) - min(rates)) / rate if rate else float("nan")
            windows = [r.window_cpu_per_100k for r in of_name]
            window = statistics.median(windows)
            cpu_spread = (max(windows) - min(windows)) / window if window else float("nan")
            print(
                f"{name:<17}{rate:>10,.0f} fragments/s{cpu:>8.1f} CPU s/100k"
                f"  spread {spread:4.0%}  ({', '.join(f'{r:,.0f}' for r in rates)});"
                f" CPU in the window {window:.2f} s/100k, spread {cpu_spread:4.0%}"
            )
            groups = {
                g: [r.window_cpu.get(g, 0.0) for r in of_name]
                for g in of_name[0].window_cpu
                if g not in BESIDE
            }
            broker = [r.window_cpu.get("broker", float("nan")) for r in of_name]
            busy = [r.machine_busy for r in of_name]
            print(
                " " * 17
                + "  CPU in the window by thread: "
                + ", ".join(f"{g} {min(c):.2f}-{max(c):.2f}" for g, c in groups.items())
                + f"; the broker's {min(broker):.2f}-{max(broker):.2f}"
                + f"; machine busy {min(busy):.0%}-{max(busy):.0%}"
            )
    ours = [n for n in runs if n.startswith("sessions-app")]
    pairs = [(a, b) for a in ours for b in runs if not b.startswith("sessions-app")]
    # Scaling on one machine: two workers against one.
    if {"sessions-app-2w", "sessions-app"} <= set(runs):
        pairs.append(("sessions-app-2w", "sessions-app"))
    for mine, other in pairs:
        # Per round: the two ran minutes apart on the same machine.
        ratios = [
            a.fragments_per_s / b.fragments_per_s
            for a, b in zip(runs[mine], runs[other], strict=True)
            if a.fragments_per_s and b.fragments_per_s
        ]
        if ratios:
            each = ", ".join(f"{r:.2f}" for r in ratios)
            median = statistics.median(ratios)
            print(f"{mine:<16} / {other:<16} {median:6.2f}x" + (f"  ({each})" * (len(ratios) > 1)))


if __name__ == "__main__":
    main()
