"""The consumer thread's fetched batches: the intake topic's records come out as Fragments.

Real record batches in Kafka's wire format, parsed by aiokafka's own
iterator; only the record builder is the intake's. The point is aiokafka's
private fetch structures (FetchResult, PartitionRecords and its
`_consumer_record`, the fetcher's records map), which the intake replaces a
part of: these tests pin aiokafka 0.14.0 (and the intake's use of them under
faust-streaming 0.15.3). What a worker does with the Fragments is tested
through its output in tests/integration.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka.consumer.fetcher import READ_UNCOMMITTED, Fetcher, FetchResult, PartitionRecords
from aiokafka.consumer.subscription_state import SubscriptionState
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import TopicPartition

from sessions_app.core.batch import Fragment
from sessions_app.engine.intake import Batches, Fetch, Fetchable, _FragmentRecords

Record = tuple[bytes | None, bytes | None]


def fetched(tp: TopicPartition, base: int, records: list[Record], fetch_offset: int) -> FetchResult:
    """A FetchResult as aiokafka's fetcher stores it, for `records` from offset `base` on."""
    builder = DefaultRecordBatchBuilder(2, 0, 0, -1, -1, -1, 1 << 20)
    for delta, (key, value) in enumerate(records):
        builder.append(delta, 1_700_000_000_000, key, value, [("h", b"x")])
    wire = bytearray(builder.build())
    wire[:8] = base.to_bytes(8, "big", signed=True)  # the base offset the broker assigns
    partition_records = PartitionRecords(
        tp, MemoryRecords(bytes(wire)), [], fetch_offset, None, None, True, READ_UNCOMMITTED
    )
    return FetchResult(tp, partition_records=partition_records, assignment=None, backoff=0)


def parsed(result: FetchResult) -> list[object]:
    return list(result._partition_records)


def test_intake_records_come_out_as_fragments_byte_for_byte() -> None:
    """aiokafka 0.14.0's PartitionRecords builds the intake's Fragments, offsets included."""
    p0, p3 = TopicPartition("fragments", 0), TopicPartition("fragments", 3)
    first: list[Record] = [(b"s1", b"GET / HT"), (b"s2", b"\x00\xff\r\n"), (b"s1", None)]
    second: list[Record] = [(b"s9", b""), (b"s9", b"tail\r")]
    store = _FragmentRecords("fragments", {})
    store[p0] = fetched(p0, 40, first, 40)
    store[p3] = fetched(p3, 7, second, 7)

    assert parsed(store[p0]) == [
        Fragment("fragments", 0, 40, b"s1", b"GET / HT"),
        Fragment("fragments", 0, 41, b"s2", b"\x00\xff\r\n"),
        Fragment("fragments", 0, 42, b"s1", None),
    ]
    assert parsed(store[p3]) == [
        Fragment("fragments", 3, 7, b"s9", b""),
        Fragment("fragments", 3, 8, b"s9", b"tail\r"),
    ]


def test_aiokafka_still_decides_which_records_of_a_batch_are_returned() -> None:
    """aiokafka 0.14.0 skips what a fetch position passed and moves its next fetch offset."""
    tp = TopicPartition("fragments", 1)
    store = _FragmentRecords("fragments", {})
    # A fetch from offset 12 into a batch starting at 10: the first two were returned before.
    store[tp] = fetched(tp, 10, [(b"a", b"1"), (b"b", b"2"), (b"c", b"3")], 12)

    assert parsed(store[tp]) == [Fragment("fragments", 1, 12, b"c", b"3")]
    assert store[tp]._partition_records.next_fetch_offset == 13


def test_records_fetched_before_the_map_was_installed_are_built_as_fragments_too() -> None:
    """Fetches aiokafka 0.14.0's fetcher stored before the intake's map replaced its own."""
    tp = TopicPartition("fragments", 2)
    before = {tp: fetched(tp, 0, [(b"k", b"v")], 0)}

    store = _FragmentRecords("fragments", before)

    assert parsed(store[tp]) == [Fragment("fragments", 2, 0, b"k", b"v")]


def test_other_topics_keep_aiokafkas_records() -> None:
    """Topics other than the intake's keep aiokafka 0.14.0's ConsumerRecord."""
    tp = TopicPartition("sessions-changelog", 0)
    store = _FragmentRecords("fragments", {})
    store[tp] = fetched(tp, 5, [(b"k", b"v")], 5)

    (record,) = parsed(store[tp])
    assert not isinstance(record, Fragment)
    assert (record.topic, record.offset, record.key, record.value) == (tp.topic, 5, b"k", b"v")
    assert record.headers == (("h", b"x"),)


def positioned(tp: TopicPartition, at: int) -> Any:
    """aiokafka 0.14.0's subscription with `tp` assigned and its position at `at`."""
    subscriptions = SubscriptionState()
    subscriptions.assign_from_user({tp})
    subscriptions.subscription.assignment.state_value(tp).seek(at)
    return subscriptions


async def hand_over(
    subscriptions: Any, tp: TopicPartition, base: int, values: list[bytes], partitions: Any
) -> list[int]:
    """Run aiokafka 0.14.0's `Fetcher.fetched_records` over one fetch of `tp` from `base`.

    Return the offsets it hands over.
    """
    result = fetched(tp, base, [(b"k", value) for value in values], base)
    result._assignment = subscriptions.subscription.assignment
    fetcher = SimpleNamespace(
        _subscriptions=subscriptions,
        _records={tp: result},
        _notify=lambda future: None,
        _wait_consume_future=None,
    )
    drained = await Fetcher.fetched_records(fetcher, partitions, timeout=0)  # type: ignore[arg-type]
    return [record.offset for record in drained.get(tp, [])]


def test_no_record_is_handed_over_while_no_partition_is_active() -> None:
    """aiokafka takes an empty set for every partition; the intake's view for none.

    Records aiokafka hands over move its position past them: handed over while their
    partition is paused, they would be dropped and never read again.
    """

    async def scenario() -> None:
        tp = TopicPartition("fragments", 0)
        subscriptions = positioned(tp, 140)
        position = subscriptions.subscription.assignment.state_value(tp)
        active: set[TopicPartition] = set()

        assert await hand_over(subscriptions, tp, 140, [b"v", b"w"], Fetchable(active)) == []
        assert position.position == 140
        # The same fetch once the partition is active.
        active.add(tp)
        assert await hand_over(subscriptions, tp, 140, [b"v", b"w"], Fetchable(active)) == [
            140,
            141,
        ]
        assert position.position == 142
        # What aiokafka does with Faust's set when it is empty: all of it, the position moved.
        assert await hand_over(subscriptions, tp, 142, [b"x"], set()) == [142]
        assert position.position == 143

    asyncio.run(scenario())


def _fetch(partition: int, first: int, count: int) -> Fetch:
    return 1, {partition: [Fragment("in", partition, first + i, b"s", b"x") for i in range(count)]}


@pytest.mark.parametrize(("most", "expected"), [(25, [[0, 1], [2, 3], [4]]), (15, [[0], [1], [2]])])
def test_a_batch_takes_the_fetch_that_waited_for_room_in_the_queue(
    most: int, expected: list[list[int]]
) -> None:
    """The consumer's loop blocks on a full queue; the fetch it holds joins the next batch.

    With one fetch of room, as a worker with SESSIONS_BATCH_FRAGMENTS twice the fetch
    size has, each batch holds two fetches of 10, not the one the queue held. Under a
    bound of 15 a fetch that does not fit starts the next batch instead. In order.
    """

    async def scenario() -> list[list[list[int]]]:
        intake: asyncio.Queue[Fetch] = asyncio.Queue(maxsize=1)

        async def consumer_loop() -> None:
            for n in range(5):
                await intake.put(_fetch(n % 2, 10 * n, 10))

        feeding = asyncio.create_task(consumer_loop())
        await asyncio.sleep(0)  # the loop fills the queue and blocks on its second fetch
        batches, got = Batches(intake, most), []
        for _ in range(3):
            fetches = await batches.next()
            got.append(
                [[f.offset for fs in fetched.values() for f in fs] for _, fetched in fetches]
            )
        feeding.cancel()
        return got

    got = asyncio.run(scenario())
    offsets = [
        [[10 * n + i for i in range(10)] for n in fetch_numbers] for fetch_numbers in expected
    ]
    assert got == offsets
