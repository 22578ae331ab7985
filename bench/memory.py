"""Memory benchmark: sessions-app against the dict design, as sessions accumulate.

Feeds distinct sessions, each left with an unfinished remnant of about 64
bytes, into one sessions-app worker and one dict-design consumer on the
same embedded broker and input, and prints both processes' RSS after
100k, 1M and 5M sessions, and what a census of them (GET /census/) costs the
worker: its time, the longest event-loop stall meanwhile, and RSS. Then it
stops the worker with 100k idle sessions of another app, waits past the
idle timeout, restarts it so all of them
expire in one sweep, and prints the longest event-loop stall meanwhile.

Then the rate as sessions accumulate (`--hold`, 10M by default): a worker
alone (no dict design beside it) takes a backlog of that many new sessions
and two steps more, one fragment each, 64-byte tails, idle timeout a day, the
cap at the total;
for every million it prints fragments per second (from its applied totals,
sampled every 0.25 s), the rate against the first million's, the longest
event-loop stall, and RSS; then the same for a step at the cap, where every
new session evicts the longest idle one.

    .venv/bin/python -m bench.memory                 # 100k, 1M, 5M; hold to 10M
    .venv/bin/python -m bench.memory --steps 100000,1000000 --hold 0
    .venv/bin/python -m bench.memory --skip-growth --expiry-sessions 0   # the hold alone
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import ROOT, bench_worker, mib, rss_bytes
from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync
from sessions_app.tools.harness import WorkerProcess, remnant_sessions, send_remnants

REMNANT = b"r" * 64
PARTITIONS = 8


def dict_progress(path: Path) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def wait_dict(path: Path, at_least: int, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while dict_progress(path) < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError("dict design did not keep up")
        time.sleep(0.5)


#: Each phase's topics: SESSIONS_<ROLE>_TOPIC is "<prefix>-<suffix>".
TOPIC_SUFFIXES = {
    "INPUT": "in",
    "OUTPUT": "out",
    "EXPIRED": "expired",
    "DLQ": "dlq",
    "ALERTS": "alerts",
}


def app_settings(broker: EmbeddedBroker, prefix: str, app_id: str) -> dict[str, str]:
    """Create a phase's topics, named after `prefix`; return its worker's settings for them."""
    topics = {role: f"{prefix}-{suffix}" for role, suffix in TOPIC_SUFFIXES.items()}
    create_topics_sync(broker.bootstrap, list(topics.values()), PARTITIONS)
    return {
        "SESSIONS_APP_ID": app_id,
        **{f"SESSIONS_{role}_TOPIC": topic for role, topic in topics.items()},
        "SESSIONS_PARTITIONS": str(PARTITIONS),
    }


def growth(broker: EmbeddedBroker, workdir: Path, steps: list[int]) -> None:
    create_topics_sync(broker.bootstrap, ["mem-dict-out"], PARTITIONS)
    app = bench_worker(
        broker,
        workdir,
        **app_settings(broker, "mem", "bench-memory"),
        SESSIONS_MAX_SESSIONS=str(10 * max(steps)),
        SESSIONS_IDLE_TIMEOUT=str(7 * 86400),
    ).start()
    progress = workdir / "dict.progress"
    dict_design = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.dict_design",
            broker.bootstrap,
            "mem-in",
            "mem-dict-out",
            str(progress),
            "1",
        ],
        cwd=ROOT,
    )
    try:
        time.sleep(3)
        base_app, base_dict = rss_bytes(app.pid), rss_bytes(dict_design.pid)
        print(
            f"{'sessions':>10} {'sessions-app RSS':>18} {'dict design RSS':>18}   (at start: "
            f"{mib(base_app)}, {mib(base_dict)})",
            flush=True,
        )
        rows = []
        sent = 0
        census: dict[str, object] = {}
        for step in steps:
            sessions = remnant_sessions("s", sent, step, REMNANT)
            seconds = asyncio.run(send_remnants(broker.bootstrap, "mem-in", sessions, b"\n"))
            print(f"  sent {step - sent:,} sessions in {seconds:.0f}s", flush=True)
            sent = step
            began = time.monotonic()
            stats = app.wait_until(
                lambda s, n=step: s["totals"]["fragments_consumed"] >= n,
                f"{step:,} fragments consumed",
                timeout=3600,
                poll=0.5,
            )
            took = time.monotonic() - began
            wait_dict(progress, step)
            time.sleep(3)
            app_rss, dict_rss = rss_bytes(app.pid), rss_bytes(dict_design.pid)
            stats = app.stats()
            rows.append((step, app_rss, dict_rss))
            print(
                f"{step:>10,} {mib(app_rss):>18} {mib(dict_rss):>18}   "
                f"live={stats['live_sessions']:,} rocksdb={stats['rocksdb']} "
                f"(worker caught up {took:.0f}s after the send)",
                flush=True,
            )
            census = census_cost(app, census)
        if len(rows) >= 2:
            (n0, a0, d0), (n1, a1, d1) = rows[0], rows[1]
            ratio = (a1 - a0) / max(d1 - d0, 1)
            print(
                f"RSS growth {n0:,} -> {n1:,} sessions: sessions-app {mib(a1 - a0)}, "
                f"dict design {mib(d1 - d0)}: ratio {ratio:.3f} (target <= 0.1)"
            )
        print(f"largest sessions-app RSS: {mib(max(r[1] for r in rows))} (target <= 300 MiB)")
    finally:
        app.stop()
        dict_design.terminate()
        dict_design.wait()


def census_cost(app: WorkerProcess, last: dict[str, object]) -> dict[str, object]:
    """Take a census of the worker's sessions; print its time, loop stalls and RSS change.

    The worker reuses a census for its minimum interval: wait until `last` (the census
    taken before, or {}) is too old to be reused, so this one reads the sessions again.
    Return it.
    """
    if last:
        reusable_until = float(last["taken_at"]) + float(last["min_interval_seconds"])
        time.sleep(max(reusable_until - time.time() + 0.5, 0))
    # The stall window is the last 10 s: wait until it no longer holds the load's batches.
    quiet = app.wait_until(
        lambda s: s["event_loop"]["max_stall_ms_last_10s"] < 50, "a quiet loop", 60, 0.5
    )
    assert quiet
    before = rss_bytes(app.pid)
    result: dict[str, object] = {}
    taker = threading.Thread(
        target=lambda: result.update(json.loads(app.get("/census/", timeout=3600)))
    )
    taker.start()
    worst = 0.0
    while taker.is_alive():
        with contextlib.suppress(OSError):
            worst = max(worst, app.stats()["event_loop"]["max_stall_ms_last_10s"])
        time.sleep(0.25)
    taker.join()
    worst = max(worst, app.stats()["event_loop"]["max_stall_ms_last_10s"])
    print(
        f"           census of {result['sessions']:,} sessions: {result['took_seconds']}s, "
        f"longest event-loop stall meanwhile {worst:.1f} ms (target <= 50 ms), "
        f"RSS {mib(before)} -> {mib(rss_bytes(app.pid))}",
        flush=True,
    )
    return result


def expiry_stall(broker: EmbeddedBroker, workdir: Path, sessions: int, idle: float) -> None:
    env = {
        **app_settings(broker, "exp", "bench-expiry"),
        "SESSIONS_IDLE_TIMEOUT": str(idle),
        # The embedded broker under-reports end offsets of batched writes; this run restarts.
        "SESSIONS_PRODUCER_MAX_BATCH_SIZE": "1",
    }
    app = bench_worker(broker, workdir, **env).start()
    idle_sessions = remnant_sessions("e", 0, sessions, REMNANT)
    asyncio.run(send_remnants(broker.bootstrap, "exp-in", idle_sessions, b"\n"))
    # Applied and persisted, whatever the sweep has already expired meanwhile.
    app.wait_until(
        lambda s: s["totals"]["fragments_consumed"] >= sessions,
        f"{sessions:,} fragments consumed",
        timeout=3600,
        poll=0.5,
    )
    app.stop()
    time.sleep(idle + 1)
    app.start()
    worst = recovering = 0.0
    began = time.monotonic()
    try:
        while True:
            stats = app.wait_until(lambda s: True, "an answer", timeout=60, poll=0.5)
            # The stall probe runs from the start: its first 10 s window holds the recovery
            # of the restarted worker's tables, which is not what the sweep costs.
            stall = stats["event_loop"]["max_stall_ms_last_10s"]
            if time.monotonic() - began <= 10.5:
                recovering = max(recovering, stall)
            elif stats["totals"]["sessions_expired"] > 0:
                worst = max(worst, stall)
            # Done when none is left (a few may have expired before the restart).
            if stats["totals"]["sessions_expired"] > 0 and stats["live_sessions"] == 0:
                break
            time.sleep(0.2)
        took = time.monotonic() - began
        expired = app.stats()["totals"]["sessions_expired"]
        print(
            f"expiry of {sessions:,} idle sessions ({expired:,} after the restart): {took:.1f}s, "
            f"longest event-loop stall {worst:.1f} ms (target < 100 ms); in the 10 s of "
            f"the restart's recovery {recovering:.1f} ms"
        )
    finally:
        app.stop()


def rate_hold(broker: EmbeddedBroker, workdir: Path, total: int, step: int) -> None:
    """One worker takes `total` new sessions from a backlog; print its rate per `step`."""
    settings = app_settings(broker, "hold", "bench-hold")
    # A step at the cap, and a step more than is measured: the worker never runs out of
    # input in the last step.
    sessions = remnant_sessions("h", 0, total + 2 * step, REMNANT)
    seconds = asyncio.run(send_remnants(broker.bootstrap, "hold-in", sessions, b"\n"))
    print(f"hold: sent {total + 2 * step:,} new sessions in {seconds:.0f}s", flush=True)
    app = bench_worker(
        broker,
        workdir,
        **settings,
        SESSIONS_MAX_SESSIONS=str(total),
        SESSIONS_IDLE_TIMEOUT=str(86400),
    ).start()
    print(f"{'sessions':>12} {'fragments/s':>12} {'vs first':>9} {'longest stall':>14} {'RSS':>9}")
    samples: list[tuple[float, int, float]] = []  # (time, applied, stall in the last 10 s)
    first_rate = 0.0
    worst = 0.0
    rate = at_total = 0.0
    try:
        deadline = time.monotonic() + 7200
        for end in range(step, total + step + 1, step):
            while not samples or samples[-1][1] < end:
                if (
                    time.monotonic() > deadline
                    or app.process is None
                    or app.process.poll() is not None
                ):
                    raise RuntimeError(f"the worker stopped short of {end:,}:\n{app.log()[-2000:]}")
                with contextlib.suppress(OSError):  # a stall past the timeout: the probe tells
                    stats = json.loads(app.get("/sessions/", timeout=60))
                    applied = stats["totals"]["fragments_consumed"]
                    stall = stats["event_loop"]["max_stall_ms_last_10s"]
                    samples.append((time.monotonic(), applied, stall))
                time.sleep(0.25)
            # The first sample may come after the first fragments: count from there.
            start = max(end - step, samples[0][1])
            began, ended = crossing(samples, start), crossing(samples, end)
            if ended <= began:
                continue  # too few samples in the step to time it
            rate = (end - start) / (ended - began)
            first_rate = first_rate or rate
            # The probe's window is the last 10 s: what it saw up to the step's end.
            stall = max((s for at, _, s in samples if began <= at <= ended), default=0.0)
            worst = max(worst, stall)
            label = f"{end:,}" if end <= total else "at the cap"
            print(
                f"{label:>12} {rate:>12,.0f} {rate / first_rate:>8.2f}x {stall:>11.1f} ms "
                f"{mib(rss_bytes(app.pid)):>9}",
                flush=True,
            )
            if end <= total:
                at_total = rate
        print(
            f"hold: rate at {total:,} is {at_total / first_rate:.2f}x the rate at {step:,} "
            f"(target >= 0.75x); at the cap, where each new session evicts one, "
            f"{rate / first_rate:.2f}x; longest event-loop stall {worst:.1f} ms "
            f"(target <= 100 ms)"
        )
    finally:
        app.stop()


def crossing(samples: list[tuple[float, int, float]], count: int) -> float:
    """Return when the applied total reached `count`, interpolated between samples."""
    before = samples[0]
    if count <= before[1]:
        return before[0]
    for sample in samples:
        if sample[1] >= count:
            (t0, n0, _), (t1, n1, _) = before, sample
            return t1 if n1 == n0 else t0 + (t1 - t0) * (count - n0) / (n1 - n0)
        before = sample
    raise ValueError(f"{count:,} never reached")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="100000,1000000,5000000")
    parser.add_argument("--expiry-sessions", type=int, default=100_000)
    parser.add_argument("--skip-growth", action="store_true")
    parser.add_argument("--hold", type=int, default=10_000_000, help="sessions; 0 skips")
    parser.add_argument("--hold-step", type=int, default=1_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the work directory and logs")
    args = parser.parse_args()
    steps = [int(s) for s in args.steps.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="sessions-bench-"))
    try:
        with EmbeddedBroker() as broker:
            if not args.skip_growth:
                growth(broker, workdir / "growth", steps)
            if args.expiry_sessions:
                expiry_stall(broker, workdir / "expiry", args.expiry_sessions, idle=20)
            if args.hold:
                rate_hold(broker, workdir / "hold", args.hold, args.hold_step)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
