"""Eviction at the cap, in steps that let the event loop in, against real RocksDB instances.

No broker and no Faust worker: the pipeline's eviction reads two partitions' stores
(rocksdict) and a rebalance is made to happen between two of its steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import rocksdict
from faust.types.tuples import TP

from sessions_app.core.batch import BatchResult
from sessions_app.core.session_state import SessionState
from sessions_app.core.totals import PipelineTotals
from sessions_app.engine.store import PartitionStore, prepare_write
from sessions_app.settings import Settings
from sessions_app.stream import pipeline as pipeline_module
from sessions_app.stream.pipeline import Pipeline
from sessions_app.stream.topics import SessionTopics

OFFSET_KEY = b"__faust\0offset__"
SETTINGS = Settings()

#: Partition -> sessions stored there: (session ID, last seen, pending bytes).
STORED = {
    0: [(b"a", 100, b"a-tail"), (b"b", 300, b"b-tail")],
    1: [(b"c", 200, b"c-tail"), (b"d", 400, b"d-tail")],
}


def open_db(path: Path) -> Any:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    return rocksdict.Rdict(str(path), options)


class Stores:
    """The session store's partitions as the pipeline reaches them; a rebalance swaps them."""

    def __init__(self, dbs: dict[int, Any], root: Path) -> None:
        self.dbs = dbs
        self.root = root
        self.opened: dict[int, PartitionStore | None] = {
            partition: PartitionStore(db, OFFSET_KEY) for partition, db in dbs.items()
        }

    def partition(self, partition: int) -> PartitionStore | None:
        return self.opened.get(partition)

    def open_partitions(self) -> set[int]:
        return {p for p, opened in self.opened.items() if opened is not None}

    def revoke(self, partition: int, *, reopen: bool) -> None:
        """Close the partition's instance, as Faust does on a revoke; open it again if told."""
        self.dbs[partition].close()
        self.opened[partition] = None
        if reopen:
            self.dbs[partition] = open_db(self.root / f"p{partition}")
            self.opened[partition] = PartitionStore(self.dbs[partition], OFFSET_KEY)


class Consumer:
    def assignment(self) -> set[TP]:
        return {TP(SETTINGS.input_topic, partition) for partition in STORED}


class App:
    consumer = Consumer()


class Table:
    def __init__(self, stores: Stores) -> None:
        self.data = stores


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    dbs = {}
    for partition, sessions in STORED.items():
        db = dbs[partition] = open_db(tmp_path / f"p{partition}")
        store = PartitionStore(db, OFFSET_KEY)
        writes: dict[bytes, SessionState | None] = {
            sid: SessionState(0, 1, seen, pending) for sid, seen, pending in sessions
        }
        encoded = {sid: s.encode() for sid, s in writes.items() if s is not None}
        store.commit(prepare_write(writes, dict.fromkeys(writes), encoded), 0)
    stores = Stores(dbs, tmp_path)
    yield stores
    for partition, opened in stores.opened.items():
        if opened is not None:
            stores.dbs[partition].close()


def pipeline_over(stores: Stores) -> Pipeline:
    return Pipeline(
        app=App(),
        settings=SETTINGS,
        table=Table(stores),
        topics=SessionTopics(*(object() for _ in range(5))),
        delivery=None,  # type: ignore[arg-type]
        totals=PipelineTotals(),
        capacity=None,  # type: ignore[arg-type]
    )


def expired(result: BatchResult) -> list[tuple[bytes | None, bytes | None]]:
    return [(record.key, record.value) for record in result.expired]


def test_eviction_in_steps_takes_the_longest_idle_across_partitions(
    stores: Stores, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "EVICTION_STEP", 1)
    pipeline = pipeline_over(stores)
    results: dict[int, BatchResult] = {}
    evictions = asyncio.run(pipeline._evict(results, 3, {}))
    assert evictions == {0: 2, 1: 1}
    assert results[0].writes == {b"a": None, b"b": None}
    assert results[1].writes == {b"c": None}
    # What they held goes to the expired topic, longest idle first.
    assert expired(results[0]) == [(b"a", b"a-tail"), (b"b", b"b-tail")]
    assert expired(results[1]) == [(b"c", b"c-tail")]


@pytest.mark.parametrize("reopened", [False, True])
@pytest.mark.parametrize("turns", [1, 4], ids=["while-reading", "after-reading"])
def test_a_partition_revoked_during_eviction_loses_its_evictions_and_its_results(
    stores: Stores, monkeypatch: pytest.MonkeyPatch, reopened: bool, turns: int
) -> None:
    """Revoked (or revoked and recovered) between two steps: the new owner has the partition.

    Its sessions must not be evicted, and what the batch produced for it must not be
    sent: the new owner reads those fragments again. The rebalance comes while the
    victims' states are read, or once they are read and before c is taken.
    """
    monkeypatch.setattr(pipeline_module, "EVICTION_STEP", 1)
    pipeline = pipeline_over(stores)
    applied = [1]
    # Partition 1 had fragments in the batch: its result is there before the eviction.
    results = {1: BatchResult(applied_through=9)}
    owners: dict[int, PartitionStore | None] = {1: stores.partition(1)}

    async def scenario() -> dict[int, int]:
        async def rebalance() -> None:
            for _ in range(turns):
                await asyncio.sleep(0)
            stores.revoke(1, reopen=reopened)

        task = asyncio.create_task(rebalance())
        evictions = await pipeline._evict(results, 3, owners)
        await task
        return evictions

    evictions = asyncio.run(scenario())
    assert evictions == {0: 2}
    assert results[0].writes == {b"a": None, b"b": None}
    assert results[1].writes == {}  # c was chosen, but its partition had gone
    assert pipeline._drop_revoked(results, applied, owners)
    assert set(results) == {0}
    assert applied == []
    # Nothing was written: the sessions are all still stored.
    if not reopened:
        stores.dbs[1] = open_db(stores.root / "p1")
        stores.opened[1] = PartitionStore(stores.dbs[1], OFFSET_KEY)
    for partition in STORED:
        opened = stores.partition(partition)
        assert opened is not None
        assert opened.live_count() == 2
