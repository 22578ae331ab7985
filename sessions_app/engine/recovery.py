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
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from faust.tables import TableManager
from faust.tables.recovery import Recovery


class OrderedRecovery(Recovery):
    """Recovery that seeks source partitions before resuming them."""

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
