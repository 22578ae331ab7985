"""The session buffers table: RocksDB partitions under one memory budget, changelogged."""

from __future__ import annotations

from typing import Any

import faust

from sessions_app.engine.store import SessionStore
from sessions_app.settings import Settings


class SessionBuffersTable(faust.Table[bytes, bytes]):
    """A Faust table whose store is the budgeted SessionStore."""

    def __init__(self, *args: Any, memory_budget: int, **kwargs: Any) -> None:
        self.memory_budget = memory_budget
        super().__init__(*args, **kwargs)

    def _new_store(self) -> SessionStore:
        return SessionStore(
            "rocksdb://",
            self.app,
            self,
            table_name=self.name,
            key_type=self.key_type,
            key_serializer=self.key_serializer,
            value_serializer=self.value_serializer,
            value_type=self.value_type,
            loop=self.loop,
            options=self.options,
            memory_budget=self.memory_budget,
        )


def declare_session_buffers(app: Any, settings: Settings) -> SessionBuffersTable:
    """Declare the session buffers table on `app`."""
    table = SessionBuffersTable(
        app,
        name="session_buffers",
        beacon=app.tables.beacon,
        default=None,
        partitions=settings.partitions,
        memory_budget=settings.rocksdb_memory,
        # bytes in, bytes out: Faust picks its raw serializer for both.
        key_type=bytes,
        value_type=bytes,
    )
    app.tables.add(table)
    return table
