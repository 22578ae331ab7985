"""Eviction at the cap, in steps that let the event loop in, against real RocksDB instances.

No broker and no Faust worker: the pipeline's eviction reads two partitions' stores
(rocksdict) and a rebalance is made to happen between two of its steps. The broker is
stood in for by a recorder of what is sent (the integration tests run the real one).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import rocksdict
from faust.types.tuples import TP

from sessions_app.core.batch import BatchResult, Fragment
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
        #: A partition revoked and reopened as soon as its victims' states are read.
        self.rebalance_on_read: int | None = None

    def partition(self, partition: int) -> PartitionStore | None:
        opened = self.opened.get(partition)
        if opened is not None and partition == self.rebalance_on_read:
            states = opened.states

            def read_then_rebalance(session_ids: Any) -> Any:
                found = states(session_ids)
                self.rebalance_on_read = None
                self.revoke(partition, reopen=True)
                return found

            opened.states = read_then_rebalance  # type: ignore[method-assign]
        return opened

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


class Changelog:
    def get_topic_name(self) -> str:
        return "changelog"


class Table:
    def __init__(self, stores: Stores) -> None:
        self.data = stores
        self.changelog_topic = Changelog()


class Acks:
    def __init__(self, offsets: dict[tuple[str, int], int]) -> None:
        self.offsets = offsets
        self.first: dict[tuple[str, int], int] = {}

    async def delivered(self) -> dict[tuple[str, int], int]:
        return self.offsets


class Delivery:
    """Records what the pipeline sends; the broker takes everything."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, int, list[Any]]] = []

    async def send(self, outputs: Any, dead_letters: Any = ()) -> Acks:
        self.sent += [(topic, partition, list(records)) for topic, partition, records in outputs]
        return Acks({})

    async def hand_over(self, sends: Iterable[Any]) -> Acks:
        return Acks({where: 0 for where, _ in sends})


class Capacity:
    async def update(self, live: int) -> None:
        pass


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


def pipeline_over(
    stores: Stores, settings: Settings = SETTINGS, delivery: Delivery | None = None
) -> Pipeline:
    return Pipeline(
        app=App(),
        settings=settings,
        table=Table(stores),
        topics=SessionTopics(*(object() for _ in range(5))),
        delivery=delivery,  # type: ignore[arg-type]
        totals=PipelineTotals(),
        capacity=Capacity(),  # type: ignore[arg-type]
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


def test_the_cap_holds_when_a_rebalance_takes_an_eviction_round_s_victims(
    stores: Stores,
) -> None:
    """Partition 1 is revoked and reopened while its victim is read: it keeps its session.

    The batch opens two sessions in partition 0 at a cap of 4 (4 stored): a and c, the
    longest idle, are to go. c's partition comes back, recovered, with c in it: another
    round takes c from it again. The store ends at the cap, and every evicted session's
    bytes are sent.
    """
    delivery = Delivery()
    pipeline = pipeline_over(stores, dataclasses.replace(SETTINGS, max_sessions=4), delivery)
    stores.rebalance_on_read = 1
    batch = {0: [Fragment("in", 0, 0, b"e", b"e-tail"), Fragment("in", 0, 1, b"f", b"f-tail")]}
    asyncio.run(pipeline.process(batch))
    assert stores.rebalance_on_read is None  # the rebalance came
    live = {p: opened.live_count() for p, opened in stores.opened.items() if opened is not None}
    assert live == {0: 3, 1: 1}
    assert pipeline.totals.sessions_evicted == 2
    expired = [
        (partition, record.key, record.value)
        for topic, partition, records in delivery.sent
        if topic is pipeline.topics.expired
        for record in records
    ]
    assert expired == [(0, b"a", b"a-tail"), (1, b"c", b"c-tail")]
    kept = {
        p: [sid for _, sid in opened.oldest(5)] for p, opened in stores.opened.items() if opened
    }
    assert kept == {0: [b"b", b"e", b"f"], 1: [b"d"]}
