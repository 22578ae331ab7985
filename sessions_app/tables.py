"""The session buffers table: session ID -> SessionState bytes, in RocksDB, changelogged."""

from __future__ import annotations

from sessions_app.app import app, settings

session_buffers = app.Table(
    "session_buffers",
    default=None,
    partitions=settings.partitions,
    # bytes in, bytes out: Faust picks its raw serializer for both.
    key_type=bytes,
    value_type=bytes,
)
