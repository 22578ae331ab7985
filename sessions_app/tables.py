"""The session buffers table: RocksDB partitions under one memory budget, changelogged."""

from __future__ import annotations

from faust.stores import STORES

from sessions_app.app import app, settings
from sessions_app.store import BUDGET_OPTION

STORES.aliases["sessionsdb"] = "sessions_app.store:SessionStore"

session_buffers = app.Table(
    "session_buffers",
    default=None,
    partitions=settings.partitions,
    # With its path: yarl takes "sessionsdb://" for an empty URL, which Faust ignores.
    store="sessionsdb:session_buffers",
    options={BUDGET_OPTION: settings.rocksdb_memory},
    # bytes in, bytes out: Faust picks its raw serializer for both.
    key_type=bytes,
    value_type=bytes,
)
