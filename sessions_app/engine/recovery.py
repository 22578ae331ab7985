"""Faust's table recovery with the source partitions seeked before the stream resumes.

faust-streaming 0.15.3 resumes the source partitions and only then seeks them
to their committed offsets (in both `_resume_streams` and
`on_recovery_completed`), so records fetched from the old position can reach
the agent ahead of earlier offsets. It also seeks only partitions with a
committed offset above zero, while records it fetched and dropped during
recovery have already moved the client's position: such a partition would
resume after records nobody processed. Both lose fragments. This recovery
seeks every source partition, to its committed offset or to the beginning
when there is none, before it resumes any of them.

The two methods below are Faust's own with only that order changed, checked
against faust-streaming 0.15.3; the version pin in pyproject.toml keeps them in
step with the code they replace.

Changelog records are applied a fetch at a time. Faust's recovery takes them one
by one from a queue (an Event, a queue put and a task pair each, then a
bookkeeping pass per record), which held a rebuild near a fifth of the rate at
which a plain consumer reads the same changelog. Here the consumer hands each
fetched changelog partition to `apply_fetched` (sessions_app.engine.intake),
which skips what was applied, writes the rest to RocksDB in one write batch
with the idle index and count (SessionStore.apply_changelog_records), and keeps
the offsets Faust's recovery reads to know when the partitions are rebuilt.
Standby replicas take the same path, so they follow the changelog a fetch at a
time instead of in buffers of a thousand records.

Faust internals used: `active_offsets`, `standby_offsets`, `tp_to_table`,
`signal_recovery_end`, `_set_recovery_started`, `_set_recovery_ended`,
`_slurp_changelogs`, `_active_events_received_at`,
`_standby_events_received_at`, `_last_flush_at`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any, cast

from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.types import TP
from mode import Service

from sessions_app.core.batch import Fragment
from sessions_app.engine.store import SessionStore

#: How often recovery checks that nothing is left to read when no record arrives.
IDLE_CHECK_SECONDS = 0.5


class OrderedRecovery(Recovery):
    """Recovery that seeks source partitions before resuming them and applies fetches whole."""

    _rebuilt = 0
    _rebuild_began: float | None = None

    def apply_fetched(self, tp: TP, records: Sequence[Fragment]) -> None:
        """Apply a fetch of a changelog partition: what Faust's loop does per record, at once."""
        if tp in self.active_tps:
            offsets, received = self.active_offsets, self._active_events_received_at
            active = True
        elif tp in self.standby_tps:
            offsets, received = self.standby_offsets, self._standby_events_received_at
            active = False
        else:
            return  # revoked since the fetch: its new owner reads it
        seen = offsets.get(tp)
        if seen is not None and records and records[0].offset <= seen:
            records = [record for record in records if record.offset > seen]
        if not records:
            return
        now = time.monotonic()
        store = cast(Any, self.tp_to_table[tp]).data
        assert isinstance(store, SessionStore), "the sessions table's store is a SessionStore"
        store.apply_changelog_records(tp.partition, records)
        offsets[tp] = records[-1].offset
        received[tp] = now
        self._last_flush_at = now
        if active and self.in_recovery:
            if self._rebuild_began is None:
                self._rebuild_began = now
            self._rebuilt += len(records)
        self._signal_if_rebuilt()
        if not self.tables.standbys_ready and not self.standby_remaining_total():
            self.tables.on_standbys_ready()

    def standby_progress(self) -> dict[int, dict[str, int | None]]:
        """Per standby partition: the changelog offset applied, the end fetched, the lag.

        The end is unknown (None) until the partition's first fetch, and while a
        rebalance has taken it from the consumer but not yet from the recovery.
        """
        consumer = cast(Any, self.app.consumer)
        try:
            assigned = consumer.assignment()
        except Exception:  # the consumer is starting or stopping
            assigned = set()
        found: dict[int, dict[str, int | None]] = {}
        for tp in sorted(self.standby_tps):
            applied = self.standby_offsets.get(tp)
            applied = -1 if applied is None else applied
            end = consumer.highwater(tp) if tp in assigned else None
            lag = None if end is None else max(end - 1 - applied, 0)
            found[tp.partition] = {"applied_offset": applied, "end_offset": end, "lag": lag}
        return found

    def _signal_if_rebuilt(self) -> None:
        """Tell recovery its active partitions are rebuilt, once nothing is left to read."""
        if not self.in_recovery or self.need_recovery():
            return
        self._set_recovery_ended()
        if self._rebuilt:
            took = time.monotonic() - (self._rebuild_began or time.monotonic())
            self.log.info(
                "Rebuilt %d changelog records in %.3f s (%.0f records/s)",
                self._rebuilt,
                took,
                self._rebuilt / max(took, 1e-6),
            )
        self.signal_recovery_end.set()

    def _set_recovery_started(self) -> None:
        super()._set_recovery_started()
        # A signal left from an earlier recovery must not end this one.
        self.signal_recovery_end.clear()
        self._rebuilt, self._rebuild_began = 0, None

    @Service.task
    async def _slurp_changelogs(self) -> None:
        """Faust's loop over the changelog queue, which nothing fills any more.

        Faust's loop clears the end signal on every turn, even with no record: left
        running, it could clear a signal `apply_fetched` had just set, before recovery
        waits for it, and recovery would wait forever. This one only checks twice a
        second that nothing is left to read, a safety net behind `apply_fetched`,
        which signals as soon as it applies the last record. As in Faust's loop
        without transactions, a changelog whose last offsets hold no record would
        keep recovery waiting; this app's changelog has no transaction markers,
        and compaction keeps every partition's last record.
        """
        while not self.should_stop:
            await self.sleep(IDLE_CHECK_SECONDS)
            self._signal_if_rebuilt()

    async def _seek_and_resume_sources(self) -> None:
        app = self.app
        consumer = cast(Any, app.consumer)
        sources = {tp for tp in consumer.assignment() if not self._is_changelog_tp(tp)}
        if not sources:
            return
        self.log.info("Seek stream partitions to committed offsets.")
        await self._wait(consumer.perform_seek(), timeout=app.conf.broker_request_timeout)
        uncommitted = [tp for tp in sources if not consumer._committed_offset.get(tp)]
        if uncommitted:
            self.log.info(
                "Seek %d uncommitted stream partitions to the beginning", len(uncommitted)
            )
            timeout = app.conf.broker_request_timeout
            earliest: dict[Any, int] = {}

            async def find_earliest() -> None:
                earliest.update(await consumer.earliest_offsets(*uncommitted))

            await self._wait(find_earliest(), timeout=timeout)
            await self._wait(consumer.seek_wait(earliest), timeout=timeout)
        consumer.resume_partitions(sources)

    async def _resume_streams(self, generation_id: int = 0) -> None:
        app = self.app
        await app.on_rebalance_complete.send()
        if app.consumer_generation_id != generation_id:
            self.log.warning("Recovery rebalancing again")
            return
        await self._seek_and_resume_sources()
        await self._finish(standbys_ready=True)

    async def on_recovery_completed(self, generation_id: int = 0) -> None:
        app = self.app
        self.log.info("Restore complete!")
        await app.on_rebalance_complete.send()
        self._set_recovery_ended()
        callbacks = [
            asyncio.ensure_future(
                table.on_recovery_completed(
                    self.actives_for_table[table], self.standbys_for_table[table]
                )
            )
            for table in self.tables.values()
        ]
        if callbacks:
            await asyncio.wait(callbacks)
        if app.consumer_generation_id != generation_id:
            self.log.warning("Recovery rebalancing again")
            return
        await self._seek_and_resume_sources()
        await self._finish(standbys_ready=not app.assignor.assigned_standbys())

    async def _finish(self, standbys_ready: bool) -> None:
        app = self.app
        self.completed.set()
        app.flow_control.resume()
        app.consumer.resume_flow()
        await cast(Any, app)._fetcher.maybe_start()
        self.tables.on_actives_ready()
        if standbys_ready:
            self.tables.on_standbys_ready()
        app.on_rebalance_end()
        self.log.info("Worker ready")


class OrderedTableManager(TableManager):
    """The table manager whose recovery is OrderedRecovery."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = OrderedRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
