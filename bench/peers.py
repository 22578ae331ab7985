"""The other contenders of the throughput benchmark, each run as its own process.

    python -m bench.peers raw  BOOTSTRAP SOURCE SINK [GROUP]
    python -m bench.peers quix BOOTSTRAP SOURCE SINK DELIMITER STATE_DIR GROUP

`raw` consumes and produces every fragment unchanged with aiokafka: the limit
for a Python worker. `quix` does sessions-app's job with quixstreams and its
RocksDB state (changelogged): append the fragment to the session's buffer,
cut complete records at the delimiter, produce them under the session's key.
The dict design is bench/dict_design.py, stock Faust is bench/stock_faust.py.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from bench.common import Committer, passthrough_clients
from sessions_app.settings import parse_delimiter


async def raw(bootstrap: str, source: str, sink: str, group: str | None = None) -> None:
    consumer, producer = passthrough_clients(bootstrap, source, group)
    committer = Committer(consumer, group is not None)
    await consumer.start()
    await producer.start()
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=200, max_records=10_000)
            pending = [
                await producer.send(sink, record.value, key=record.key)
                for records in batches.values()
                for record in records
            ]
            if pending:
                await asyncio.gather(*pending)
            await committer.maybe_commit()
    finally:
        await consumer.stop()
        await producer.stop()


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


def quix(
    bootstrap: str, source: str, sink: str, delimiter: bytes, state_dir: str, group: str
) -> None:
    from quixstreams import Application
    from quixstreams.models.topics import TopicConfig
    from quixstreams.state.rocksdb import RocksDBOptions

    app = Application(
        broker_address=bootstrap,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        # The embedded broker holds a JoinGroup for half the session timeout.
        consumer_extra_config={"session.timeout.ms": 2000, "heartbeat.interval.ms": 500},
        loglevel="WARNING",
        # Buffers are bytes: stored as they are, not as JSON.
        rocksdb_options=RocksDBOptions(dumps=_as_bytes, loads=bytes),
    )
    topic = app.topic(source, key_deserializer="bytes", value_deserializer="bytes")
    # The embedded broker's DescribeConfigs omits retention.ms, which quixstreams needs to
    # derive its changelog topic's settings: say what the broker does (no retention).
    partitions = topic.broker_config.num_partitions
    topic.broker_config = TopicConfig(
        num_partitions=partitions,
        replication_factor=1,
        extra_config={"retention.ms": "-1", "retention.bytes": "-1"},
    )
    out = app.topic(sink, key_serializer="bytes", value_serializer="bytes")

    def cut(fragment: bytes, state: Any) -> list[bytes]:
        *complete, tail = (state.get("buffer", b"") + fragment).split(delimiter)
        state.set("buffer", tail)
        return complete

    app.dataframe(topic).apply(cut, stateful=True, expand=True).to_topic(out)
    app.run()


if __name__ == "__main__":
    kind, bootstrap, source, sink, *rest = sys.argv[1:]
    if kind == "raw":
        asyncio.run(raw(bootstrap, source, sink, *rest[:1]))
    elif kind == "quix":
        delimiter, state_dir, group = rest
        quix(bootstrap, source, sink, parse_delimiter("DELIMITER", delimiter), state_dir, group)
    else:
        raise SystemExit(f"unknown peer {kind!r}: raw or quix")
