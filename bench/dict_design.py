"""The design sessions-app replaces: an aiokafka consumer keeping session buffers in a dict.

Run as a process by the benchmarks: it consumes the input topic, appends
each fragment to its session's bytes, cuts records at the delimiter,
produces them, and keeps the unfinished tails in a plain dict. It writes
its progress (fragments consumed) to a file the benchmark polls. Given a
consumer group, it commits as an at-least-once consumer does, every few
seconds once what it consumed is delivered.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

from bench.common import Committer, passthrough_clients
from sessions_app.settings import parse_delimiter


async def main(
    bootstrap: str,
    source: str,
    sink: str,
    progress: Path,
    produce: bool,
    delimiter: bytes,
    group: str | None = None,
) -> None:
    consumer, producer = passthrough_clients(bootstrap, source, group)
    committer = Committer(consumer, group is not None)
    await consumer.start()
    await producer.start()
    buffers: dict[bytes, bytes] = {}
    consumed = 0
    last_report = 0.0
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            pending = []
            for records in batches.values():
                for record in records:
                    data = buffers.get(record.key, b"") + record.value
                    *complete, tail = data.split(delimiter)
                    buffers[record.key] = tail
                    if produce:
                        for item in complete:
                            pending.append(await producer.send(sink, item, key=record.key))
                    consumed += 1
            if pending:
                await asyncio.gather(*pending)
            await committer.maybe_commit()
            now = time.monotonic()
            if now - last_report > 0.2:
                progress.write_text(f"{consumed} {time.time()}")
                last_report = now
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    bootstrap, source, sink, progress, produce = sys.argv[1:6]
    # Optional: the delimiter, with escapes such as \r\n (default \n), and a consumer group.
    escaped = sys.argv[6] if len(sys.argv) > 6 else "\\n"
    group = sys.argv[7] if len(sys.argv) > 7 else None
    delimiter = parse_delimiter("delimiter argument", escaped)
    asyncio.run(main(bootstrap, source, sink, Path(progress), produce == "1", delimiter, group))
