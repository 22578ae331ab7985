"""Stock Faust, as its documentation shows it: an agent updating a RocksDB table per fragment.

Run by bench/throughput.py as `python -m faust -A bench.stock_faust worker`,
configured from the environment (STOCK_*). The same job as sessions-app:
append each fragment to its session's buffer in the table, cut complete
records at the delimiter, send them to the output topic under the session's key.
"""

from __future__ import annotations

import os

import faust

from sessions_app.settings import parse_delimiter

DELIMITER = parse_delimiter("STOCK_DELIMITER", os.environ["STOCK_DELIMITER"])

app = faust.App(
    os.environ["STOCK_APP_ID"],
    broker=os.environ["STOCK_BROKER_URL"],
    store="rocksdb://",
    datadir=os.environ["STOCK_DATA_DIR"],
    topic_partitions=int(os.environ["STOCK_PARTITIONS"]),
    # The embedded broker holds a JoinGroup for half the session timeout.
    broker_session_timeout=2,
    broker_heartbeat_interval=0.5,
    broker_request_timeout=10,
    web_enabled=False,
    consumer_auto_offset_reset="earliest",
    # Buffers are bytes, stored and changelogged as they are.
    key_serializer="raw",
    value_serializer="raw",
)
source = app.topic(os.environ["STOCK_SOURCE"], key_serializer="raw", value_serializer="raw")
sink = app.topic(os.environ["STOCK_SINK"], key_serializer="raw", value_serializer="raw")
buffers = app.Table("buffers", default=bytes, key_type=bytes, value_type=bytes)


@app.agent(source)
async def reassemble(stream: faust.Stream) -> None:  # type: ignore[type-arg]
    async for key, fragment in stream.items():
        *complete, tail = (buffers[key] + fragment).split(DELIMITER)
        buffers[key] = tail
        for record in complete:
            await sink.send(key=key, value=record)
