"""The order of a change set's steps: outputs, then changelog, then RocksDB, each acknowledged.

README's delivery guarantee rests on this order. The broker and the store are stood in
for by recorders here (the integration tests run the real ones); what is checked is
only what happens in which order, and that a step that fails stops the ones after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from sessions_app.core.session_state import SessionState
from sessions_app.core.totals import PipelineTotals
from sessions_app.settings import Settings
from sessions_app.stream.pipeline import ChangeSet, PartitionChanges, Pipeline
from sessions_app.stream.topics import SessionTopics


class Broken(RuntimeError):
    """The failure a step is made to have."""


@dataclass
class Acks:
    """What the broker acknowledges: records it, or fails as told."""

    what: str
    log: list[str]
    fail: str | None
    reopen: Callable[[], None] | None = None
    first: dict[tuple[str, int], int] = field(default_factory=dict)

    async def delivered(self) -> dict[tuple[str, int], int]:
        if self.fail == self.what:
            raise Broken(self.what)
        self.log.append(f"{self.what} acknowledged")
        if self.what == "changelog" and self.reopen is not None:
            self.reopen()  # a rebalance meanwhile: revoked, assigned again, recovered
        return {("changelog", 3): 41} if self.what == "changelog" else {}


class Delivery:
    def __init__(self, log: list[str], fail: str | None) -> None:
        self.log, self.fail = log, fail
        self.reopen: Callable[[], None] | None = None

    async def send(self, outputs: Any, dead_letters: Any = ()) -> Acks:
        self.log.append("outputs handed over")
        return Acks("outputs", self.log, self.fail)

    async def hand_over(self, sends: Any) -> Acks:
        assert all(topic == "changelog" for (topic, _), _ in sends)
        self.log.append("changelog handed over")
        return Acks("changelog", self.log, self.fail, self.reopen)


class Partition:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def commit(self, prepared: Any, changelog_offset: int, first_offset: int | None) -> bool:
        self.log.append(f"rocksdb written at changelog offset {changelog_offset}")
        return True


class Store:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.opened = Partition(log)

    def partition(self, partition: int) -> Partition:
        return self.opened


class Changelog:
    def get_topic_name(self) -> str:
        return "changelog"


class Table:
    def __init__(self, log: list[str]) -> None:
        self.data = Store(log)
        self.changelog_topic = Changelog()


def commit(fail: str | None, reopen: bool = False) -> tuple[list[str], ChangeSet, bool]:
    log: list[str] = []
    table, delivery = Table(log), Delivery(log, fail)
    if reopen:

        def reopened() -> None:
            table.data.opened = Partition(log)

        delivery.reopen = reopened
    pipeline = Pipeline(
        app=None,
        settings=Settings(),
        table=table,
        topics=SessionTopics(*(object() for _ in range(5))),
        delivery=delivery,  # type: ignore[arg-type]
        totals=PipelineTotals(),
        capacity=None,  # type: ignore[arg-type]
    )
    change = ChangeSet({3: PartitionChanges({b"s": SessionState(7, 1, 5, b"tail")}, {b"s": None})})
    raised = False
    try:
        asyncio.run(pipeline.commit(change))
    except Broken:
        raised = True
    return log, change, raised


def test_outputs_then_changelog_then_rocksdb_each_acknowledged_first() -> None:
    log, change, raised = commit(fail=None)
    assert not raised
    assert log == [
        "outputs handed over",
        "outputs acknowledged",
        "changelog handed over",
        "changelog acknowledged",
        "rocksdb written at changelog offset 41",
    ]
    assert change.step == "committed"


@pytest.mark.parametrize(
    ("fail", "done", "step"),
    [
        ("outputs", ["outputs handed over"], "prepared"),
        (
            "changelog",
            ["outputs handed over", "outputs acknowledged", "changelog handed over"],
            "delivered",
        ),
    ],
)
def test_a_step_that_fails_stops_every_step_after_it(fail: str, done: list[str], step: str) -> None:
    log, change, raised = commit(fail=fail)
    assert raised  # the agent sees the failure, and stops the worker
    assert log == done  # nothing reached RocksDB, so nothing of the batch can be acked
    assert change.step == step


def test_steps_cannot_be_taken_out_of_order() -> None:
    change = ChangeSet()
    with pytest.raises(RuntimeError, match="cannot become delivered"):
        change.delivered()
    change.prepare()
    with pytest.raises(RuntimeError, match="cannot become logged"):
        change.logged()


def test_a_partition_reopened_before_its_write_is_left_to_the_changelog() -> None:
    """Revoked and assigned again between steps 2 and 3: recovery has put the change in.

    Writing the batch again would count its sessions twice in the partition's count.
    """
    log, change, raised = commit(fail=None, reopen=True)
    assert not raised
    assert log == [
        "outputs handed over",
        "outputs acknowledged",
        "changelog handed over",
        "changelog acknowledged",
    ]
    assert change.step == "committed"
