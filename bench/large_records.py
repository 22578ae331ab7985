"""Large-record benchmark: what a record sent in many small fragments costs to store.

Twenty sessions each send one 128 KiB record in 1 KiB fragments, interleaved,
at three paces: as fast as the worker takes them (pre-produced), 300
fragments/s and 60 fragments/s (uploads arriving slowly: fewer fragments of
a session share a batch). For each pace it prints the write amplification,
bytes the table's changelog received over bytes of input, and the MiB/s of
input the worker applied while it had work; beside the fast pace, the dict
design's MiB/s on the same input. Then two sessions send one 16 MiB record
each in 4 KiB fragments, with SESSIONS_MAX_BUFFER_BYTES and the topics'
max.message.bytes raised to 17 MiB. Every record is checked byte for byte.

    .venv/bin/python -m bench.large_records
"""

from __future__ import annotations

import argparse
import asyncio
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, bench_worker
from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync
from sessions_app.tools.harness import read_topic, send

DELIMITER = b"\r\n"
MiB = 1024 * 1024


def make_input(sessions: int, size: int, fragment: int, seed: int) -> tuple[dict, list]:  # type: ignore[type-arg]
    """Return each session's record and the interleaved (key, fragment) items carrying them."""
    rng = random.Random(seed)
    records = {
        f"up-{seed}-{n}".encode(): rng.randbytes(size).replace(b"\r", b"r") for n in range(sessions)
    }
    runs = []
    for key, record in records.items():
        stream = record + DELIMITER
        runs.append(
            [(key, stream[i : i + fragment], None) for i in range(0, len(stream), fragment)]
        )
    items = []
    while any(runs):
        for run in runs:
            if run:
                items.append(run.pop(0))
    return records, items


def paced(bootstrap: str, topic: str, items: list, rate: float | None) -> None:  # type: ignore[type-arg]
    if rate is None:
        asyncio.run(send(bootstrap, topic, items))
        return
    step = max(1, int(rate / 10))  # a send every 100 ms
    for start in range(0, len(items), step):
        began = time.monotonic()
        asyncio.run(send(bootstrap, topic, items[start : start + step], linger_ms=0))
        time.sleep(max(0.0, step / rate - (time.monotonic() - began)))


def run_pace(
    broker: EmbeddedBroker,
    root: Path,
    name: str,
    records: dict,
    items: list,  # type: ignore[type-arg]
    rate: float | None,
    cap: int | None = None,
) -> tuple[float, float]:
    """Run one worker over `items` at `rate`; return (amplification, MiB/s while working)."""
    topics = {kind: f"{name}-{kind}" for kind in ("in", "out", "expired", "dlq", "alerts")}
    if cap:
        # Records, remnants and stored buffers up to the cap: the topics must take them.
        configs = {"max.message.bytes": str(cap + MiB)}
        changelog = f"{name}-session_buffers-changelog"
        _create(broker.bootstrap, [topics["out"], topics["expired"], changelog], configs)
    create_topics_sync(broker.bootstrap, list(topics.values()), 4)
    env = {
        "SESSIONS_APP_ID": name,
        "SESSIONS_INPUT_TOPIC": topics["in"],
        "SESSIONS_OUTPUT_TOPIC": topics["out"],
        "SESSIONS_EXPIRED_TOPIC": topics["expired"],
        "SESSIONS_DLQ_TOPIC": topics["dlq"],
        "SESSIONS_ALERTS_TOPIC": topics["alerts"],
        "SESSIONS_PARTITIONS": "4",
        "SESSIONS_DELIMITER": "\\r\\n",
    }
    if cap:
        env["SESSIONS_MAX_BUFFER_BYTES"] = str(cap)
    worker = bench_worker(broker, root / name, **env).start()
    try:
        # One clock for every contender: from the first fragment sent to the last applied.
        began = time.monotonic()
        paced(broker.bootstrap, topics["in"], items, rate)
        worker.wait_until(
            lambda s: s["totals"]["fragments_consumed"] >= len(items), "all applied", 3600, 0.02
        )
        took = time.monotonic() - began
        out = asyncio.run(
            read_topic(broker.bootstrap, topics["out"], lambda rs: len(rs) >= len(records))
        )
        got = {r.key: r.value for r in out}
        assert got == records, "a record came out wrong"
        changelog = asyncio.run(
            read_topic(broker.bootstrap, f"{name}-session_buffers-changelog", settle=1.0)
        )
    finally:
        worker.stop()
    written = sum(len(r.key or b"") + len(r.value or b"") for r in changelog)
    received = sum(len(value) for _, value, _ in items)
    return written / received, received / MiB / took


def _create(bootstrap: str, topics: list[str], configs: dict[str, str]) -> None:
    """Create topics with these configs (4 partitions), before anything creates them plain."""

    async def create() -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(t, 4, 1, topic_configs=configs) for t in topics])
        finally:
            await admin.close()

    asyncio.run(create())


def dict_design_rate(broker: EmbeddedBroker, root: Path, items: list) -> float:  # type: ignore[type-arg]
    """The dict design's MiB/s over the same input, pre-produced."""
    source, sink = "dict-in", "dict-out"
    create_topics_sync(broker.bootstrap, [source, sink], 4)
    progress = root / "dict.progress"
    design = subprocess.Popen(
        [sys.executable, "-m", "bench.dict_design", broker.bootstrap, source, sink,
         str(progress), "1", "\\r\\n"],
        cwd=ROOT,
    )  # fmt: skip
    try:
        while not progress.exists():  # consuming, with nothing to consume yet
            time.sleep(0.05)
        began = time.monotonic()
        asyncio.run(send(broker.bootstrap, source, items))
        while True:
            try:
                done = int(progress.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                done = 0
            if done >= len(items):
                break
            time.sleep(0.02)
        took = time.monotonic() - began
    finally:
        design.terminate()
        design.wait()
    return sum(len(value) for _, value, _ in items) / MiB / took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--huge", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="sessions-large-"))
    try:
        with EmbeddedBroker() as broker:
            records, items = make_input(args.sessions, 128 * 1024, 1024, seed=1)
            received = sum(len(v) for _, v, _ in items)
            print(
                f"{args.sessions} sessions x one 128 KiB record in 1 KiB fragments: "
                f"{len(items):,} fragments, {received / MiB:.1f} MiB",
                flush=True,
            )
            for label, rate in (("fast", None), ("300/s", 300.0), ("60/s", 60.0)):
                amplification, rate_mib = run_pace(
                    broker, root, f"large-{label.replace('/', '')}", records, items, rate
                )
                extra = ""
                if rate is None:
                    extra = f"   (dict design {dict_design_rate(broker, root, items):.1f} MiB/s)"
                print(
                    f"  {label:>6}: changelog / input {amplification:.2f}x (target <= 2x), "
                    f"{rate_mib:.2f} MiB/s applied{extra}",
                    flush=True,
                )
            if args.huge:
                records, items = make_input(2, 16 * MiB, 4096, seed=2)
                amplification, rate_mib = run_pace(
                    broker, root, "huge", records, items, None, cap=17 * MiB
                )
                print(
                    f"2 sessions x one 16 MiB record in 4 KiB fragments, cap 17 MiB: whole, "
                    f"changelog / input {amplification:.2f}x, {rate_mib:.2f} MiB/s applied",
                    flush=True,
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
