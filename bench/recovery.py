"""Recovery benchmark: how fast a worker that lost its disk rebuilds its sessions.

For each N: one worker on the embedded broker takes N sessions, each left
with an unfinished remnant of 64 bytes, over 8 partitions; it is killed with
SIGKILL and its data directory wiped. Then, in the same run on the same broker:

* raw read: a plain aiokafka consumer (no group) reads the whole changelog
  from its start, as fast as it can: records/s;
* apply alone: the records just read, already in memory, go through the
  store's changelog path (PartitionStore.apply_changelog) into a fresh
  RocksDB in fetch-sized batches: records/s, the part of a rebuild that does
  not depend on the broker;
* rebuild: the worker starts on the empty directory, and the next fragment
  of the last session (its delimiter) is sent at once. It prints the
  seconds from start to "Worker ready", the rebuild window (from Faust's
  "Restoring state from changelog topics" to "Done reading from changelog
  topics" in the worker's log), sessions/s over that window and its ratio to
  the raw read rate, and the seconds from start until the last session's
  record is on the output topic, checked byte for byte.

The worker writes one record per producer batch
(SESSIONS_PRODUCER_MAX_BATCH_SIZE=1): the embedded broker under-reports end
offsets of batched writes, which breaks recovery (../shared/BROKER.md).

    .venv/bin/python -m bench.recovery [--sessions 200000,1000000] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import bench_worker
from sessions_app.core.batch import Fragment
from sessions_app.tools.embedded_broker import EmbeddedBroker, create_topics_sync
from sessions_app.tools.harness import remnant_sessions, send, send_remnants

PARTITIONS = 8
REMNANT = b"r" * 64
#: Records per apply in the in-memory measure: about one fetch of a changelog partition.
APPLY_BATCH = 2_000
LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def log_time(log: str, marker: str) -> float | None:
    """Return the time of the first log line containing `marker`, as a Unix time."""
    for line in log.splitlines():
        if marker in line:
            found = LOG_TIME.match(line)
            if found:
                stamp = datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f")
                return stamp.timestamp()
    return None


async def read_changelog(bootstrap: str, topic: str) -> tuple[list[list[Fragment]], float]:
    """Read every partition of `topic` from its start: the records per partition, seconds."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        records: list[list[Fragment]] = [[] for _ in range(PARTITIONS)]
        began = time.monotonic()
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            fetched = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, batch in fetched.items():
                records[tp.partition] += [
                    Fragment(topic, tp.partition, r.offset, r.key, r.value) for r in batch
                ]
        return records, time.monotonic() - began
    finally:
        await consumer.stop()


def apply_alone(records: list[list[Fragment]], workdir: Path) -> float:
    """Apply changelog records held in memory to fresh RocksDB instances; return seconds."""
    import rocksdict

    from sessions_app.engine.store import BudgetedOptions, MemoryBudget, PartitionStore

    budget = MemoryBudget.create(128 * 1024 * 1024)
    stores: list[Any] = []
    for partition in range(PARTITIONS):
        options = BudgetedOptions(budget).as_options()
        stores.append(rocksdict.Rdict(str(workdir / f"apply-{partition}"), options=options))
    began = time.monotonic()
    for partition, db in enumerate(stores):
        store = PartitionStore(db, b"__faust\x00offset__")
        held = records[partition]
        for start in range(0, len(held), APPLY_BATCH):
            store.apply_changelog(held[start : start + APPLY_BATCH])
    took = time.monotonic() - began
    for db in stores:
        db.close()
    return took


async def first_record(bootstrap: str, topic: str, key: bytes, value: bytes) -> float:
    """Wait for the record (`key`, `value`) on `topic` after its current end; return when."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        for tp in tps:
            await consumer.position(tp)  # fix the position before the worker emits
        while True:
            fetched = await consumer.getmany(timeout_ms=200)
            for batch in fetched.values():
                for record in batch:
                    if record.key == key:
                        if record.value != value:
                            raise AssertionError(f"record of {key!r} is {record.value!r}")
                        return time.time()
    finally:
        await consumer.stop()


def one_round(broker: EmbeddedBroker, workdir: Path, sessions: int, name: str) -> None:
    topics = [f"{name}-{t}" for t in ("in", "out", "expired", "dlq", "alerts")]
    create_topics_sync(broker.bootstrap, topics, PARTITIONS)
    app_id = f"bench-recovery-{name}"
    worker = bench_worker(
        broker,
        workdir,
        name,
        SESSIONS_APP_ID=app_id,
        SESSIONS_INPUT_TOPIC=topics[0],
        SESSIONS_OUTPUT_TOPIC=topics[1],
        SESSIONS_EXPIRED_TOPIC=topics[2],
        SESSIONS_DLQ_TOPIC=topics[3],
        SESSIONS_ALERTS_TOPIC=topics[4],
        SESSIONS_PARTITIONS=str(PARTITIONS),
        SESSIONS_MAX_SESSIONS=str(10 * sessions),
        SESSIONS_IDLE_TIMEOUT=str(7 * 86400),
        SESSIONS_STANDBY_REPLICAS="0",
        SESSIONS_PRODUCER_MAX_BATCH_SIZE="1",
    ).start()
    try:
        asyncio.run(
            send_remnants(
                broker.bootstrap, topics[0], remnant_sessions("s", 0, sessions, REMNANT), b"\n"
            )
        )
        worker.wait_until(
            lambda s: (
                s["live_sessions"] >= sessions and s["totals"]["fragments_consumed"] >= sessions
            ),
            f"{sessions:,} sessions stored",
            timeout=3600,
            poll=1.0,
        )
        time.sleep(2)  # the changelog's last acknowledgements
    finally:
        worker.kill9()
    shutil.rmtree(worker.data_dir)
    changelog = f"{app_id}-session_buffers-changelog"
    held, read_seconds = asyncio.run(read_changelog(broker.bootstrap, changelog))
    count = sum(len(p) for p in held)
    raw_rate = count / read_seconds
    print(f"  changelog: {count:,} records; raw read {read_seconds:.2f} s, {raw_rate:,.0f}/s")
    apply_seconds = apply_alone(held, workdir)
    apply_rate = count / apply_seconds
    print(
        f"  apply alone (records in memory, {APPLY_BATCH:,} per write batch): "
        f"{apply_seconds:.2f} s, {apply_rate:,.0f}/s = {apply_rate / raw_rate:.1f}x the raw read"
    )
    del held
    last = f"s-{sessions - 1:07d}".encode()
    began = time.time()
    waiter: dict[str, float] = {}

    async def restart_and_wait() -> None:
        watch = asyncio.ensure_future(first_record(broker.bootstrap, topics[1], last, REMNANT))
        await asyncio.sleep(0.5)  # the watcher is at the output's end
        nonlocal began
        began = time.time()
        await asyncio.get_running_loop().run_in_executor(None, lambda: worker.start(3600))
        waiter["ready"] = time.time()
        await send(broker.bootstrap, topics[0], [(last, b"\n", None)])
        waiter["record"] = await watch

    asyncio.run(restart_and_wait())
    log = worker.current_log()
    restoring = log_time(log, "Restoring state from changelog topics")
    done = log_time(log, "Done reading from changelog topics")
    window = (done - restoring) if restoring and done else float("nan")
    rate = sessions / window
    print(
        f"  rebuild of {sessions:,} sessions: ready {waiter['ready'] - began:.1f} s after start; "
        f"rebuild window {window:.2f} s, {rate:,.0f} sessions/s = {rate / raw_rate:.2f}x the raw "
        f"read; the last session's next record correct {waiter['record'] - began:.1f} s "
        "after start",
        flush=True,
    )
    worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", default="200000,1000000")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp, EmbeddedBroker() as broker:
        for sessions in (int(n) for n in args.sessions.split(",")):
            for n in range(args.rounds):
                print(f"{sessions:,} sessions, round {n + 1}:", flush=True)
                one_round(broker, Path(tmp), sessions, f"r{sessions}-{n}")


if __name__ == "__main__":
    main()
