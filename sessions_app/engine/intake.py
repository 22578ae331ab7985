"""A Faust consumer that hands the input topic to the agent one fetch at a time.

Faust's consumer loop costs tens of microseconds per record before the agent
sees it: a task pair per record to race the handler against a flow
suspension, a conductor lock, flow-control and producer-ebb awaits, an Event
and a queue put per record, and an ack per record afterwards. That, not the
reassembly, held the worker near 10k fragments/s. This consumer keeps
everything Faust does for correctness and does it once per fetch:

- records of partitions not active (paused, being recovered) are not handed
  over by aiokafka, even while no partition is active (`Fetchable`), and
  nothing handed over before a rebalance is applied after it: each fetch is
  tagged with the consumer generation it was handed over in, and the agent drops
  one from an older generation, as Faust drops its per-record messages; recovery
  seeks every partition again (sessions_app.recovery), so they are read again;
- the read offset per partition drops records already handed over, and offset
  gaps (compaction, transaction markers) are recorded so commits can pass them;
- acks go into Faust's own bookkeeping (`_acked`, `_acked_index`, `_n_acked`),
  so Faust's commit timer commits them as before, and so does the count
  trigger (`broker_commit_every`), but in a task beside the loop that fetches,
  not awaited by it before the next fetch.

The consumer thread parses the input topic's fetched batches straight into
`Fragment` tuples: aiokafka's `ConsumerRecord` (an eleven-field dataclass
per record, built in the thread that shares the GIL with the agent) cost
more than the reassembly of the record it carried. Everything else aiokafka
does per batch (CRC checks, control batches, aborted transactions, offsets
for the next fetch) is unchanged.

The table's changelog takes the same path during recovery and for standby
replicas: each fetch goes whole to the table recovery (engine/recovery.py),
which writes it to RocksDB in one batch, instead of an Event, a queue put and
a task pair per record. Other topics, if any agent ever consumes one, keep
Faust's per-record path.

Private names used, checked against faust-streaming 0.15.3 and aiokafka 0.14.0:
Faust's `_drain_messages`, `_wait_next_records`, `_read_offset`, `_add_gap`,
`_buffered_partitions`, `_committed_offset`, `_acked`, `_acked_index`,
`_n_acked`, `_commit_every`, `_fetch_records`, `_new_consumer_thread`; aiokafka's
`Fetcher._records`, `PartitionRecords._consumer_record` and the meaning of an
empty collection in `Fetcher.fetched_records(partitions)`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from typing import Any

from aiokafka.consumer.fetcher import FetchResult
from faust.transport.drivers.aiokafka import AIOKafkaConsumerThread, Consumer
from faust.types.tuples import TP, ack_lock
from mode.utils.futures import notify

from sessions_app.core.batch import ByPartition, Fragment, fragments_in


class _FragmentRecords(OrderedDict):  # type: ignore[type-arg]
    """aiokafka's fetched-records map, with the records of some topics built as Fragments.

    The fetcher stores each partition's fetched batches here before any record is
    parsed; the records of the intake topic and the changelog then come out of its
    iterator as `Fragment` tuples.
    """

    def __init__(self, topics: frozenset[str], fetched: Any) -> None:
        super().__init__()
        self._topics = topics
        for tp, result in fetched.items():
            self[tp] = result

    def __setitem__(self, tp: Any, result: Any) -> None:
        if tp.topic in self._topics and type(result) is FetchResult:
            # aiokafka's record iterator looks the builder up on the instance per record.
            result._partition_records._consumer_record = self._builder(tp)
        super().__setitem__(tp, result)

    def _builder(self, tp: Any) -> Callable[[Any, Any], Fragment]:
        topic, partition = tp.topic, tp.partition
        new = tuple.__new__

        def to_fragment(_tp: Any, record: Any) -> Fragment:
            fields = (topic, partition, record.offset, record.key, record.value)
            return new(Fragment, fields)

        return to_fragment


class Fetchable:
    """The partitions a fetch may hand over, read when it hands them over: none if none is active.

    aiokafka's `fetched_records(partitions)` takes an empty collection for "every
    partition", and Faust passes it its live set of active partitions, which empties
    when the last changelog partition is paused at the end of a table recovery,
    before the source partitions are resumed. A fetch waiting in aiokafka then handed
    over the source partitions' records from the offsets recovery had just sought; the
    consumer dropped them (their partitions were not active) and aiokafka's position
    had moved past them, so the worker resumed after fragments nobody applied. This
    view is never empty to aiokafka and asks Faust's set at the moment of handing over.
    """

    __slots__ = ("_live",)

    def __init__(self, live: Collection[Any]) -> None:
        self._live = live

    def __bool__(self) -> bool:
        return True

    def __contains__(self, tp: object) -> bool:
        return tp in self._live


#: What the intake queue holds per fetch: the consumer generation it came in, its fragments.
Fetch = tuple[int, ByPartition]


class Batches:
    """Takes the intake queue's fetches as batches of at most `most` fragments.

    A batch is what has been fetched when the previous one is done: the first fetch
    (waited for if none is there), and those queued behind it while they fit. A fetch
    that would take the batch past the bound starts the next one.
    """

    def __init__(self, intake: asyncio.Queue[Fetch], most: int) -> None:
        self._intake = intake
        self._most = most
        self._carried: Fetch | None = None

    async def next(self) -> list[Fetch]:
        """Return the fetches of the next batch, in the order they were fetched."""
        intake = self._intake
        first = self._carried if self._carried is not None else await intake.get()
        self._carried = None
        fetches, size = [first], fragments_in(first[1])
        # The fetch that waited for room behind the one just taken goes in on the next turn
        # of the loop: without this turn the queue looks empty and batches hold one fetch.
        await asyncio.sleep(0)
        while not intake.empty():
            fetch = intake.get_nowait()
            more = fragments_in(fetch[1])
            if size + more > self._most:
                self._carried = fetch
                break
            fetches.append(fetch)
            size += more
        return fetches


class IntakeConsumerThread(AIOKafkaConsumerThread):
    """Faust's consumer thread, fetching the intake topic as Fragments."""

    async def _fetch_records(
        self,
        consumer: Any,
        active_partitions: Any,
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Any:
        fetcher = consumer._fetcher
        intake: IntakeConsumer = self.consumer  # type: ignore[assignment]
        # Faust gives aiokafka no deserializers (it decodes in its own layer), so the
        # Fragment carries the bytes aiokafka's record would.
        if type(fetcher._records) is not _FragmentRecords:
            topics = frozenset({intake.intake_topic, *intake.changelog_topics})
            fetcher._records = _FragmentRecords(topics, fetcher._records)
        fetchable: Any = None if active_partitions is None else Fetchable(active_partitions)
        return await super()._fetch_records(
            consumer,
            fetchable,
            timeout=timeout,
            max_records=max_records,
        )


class IntakeConsumer(Consumer):
    """Faust's aiokafka consumer, with the input topic handed over a fetch at a time."""

    #: The topic whose records go to the intake queue; set by the app.
    intake_topic: str = ""
    #: Fetches waiting for the agent; beyond this the fetch loop waits (backpressure).
    #: With the app's broker_max_poll_records it bounds the fetched records held in memory.
    intake_depth: int = 1
    #: The table changelogs whose fetches go whole to `on_changelog`; set by the app.
    changelog_topics: frozenset[str] = frozenset()
    #: Applies a changelog partition's fetched records (table recovery and standbys).
    on_changelog: Callable[[TP, list[Fragment]], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._intake: asyncio.Queue[Fetch] | None = None
        #: The commit `broker_commit_every` acks started, while it runs.
        self._counted_commit: asyncio.Future[Any] | None = None

    def _new_consumer_thread(self) -> AIOKafkaConsumerThread:
        return IntakeConsumerThread(self, loop=self.loop, beacon=self.beacon)

    @property
    def intake(self) -> asyncio.Queue[Fetch]:
        """(generation, fragments per partition) per fetch."""
        if self._intake is None:
            self._intake = asyncio.Queue(maxsize=self.intake_depth)
        return self._intake

    async def _drain_messages(self, fetcher: Any) -> None:  # pragma: no cover - needs a broker
        consumer_should_stop = self._stopped.is_set
        fetcher_should_stop = fetcher._stopped.is_set
        read_offset = self._read_offset
        intake = self.intake
        try:
            while not (consumer_should_stop() or fetcher_should_stop()):
                records, active = await self._wait_next_records(1.0)
                await self.sleep(0)
                if not records or self.should_stop or not self.flow_active:
                    continue
                # As Faust's getmany: the generation the fetch is handed over in.
                generation = self.app.consumer_generation_id
                batch: ByPartition = {}
                for tp, fetched in records.items():
                    if not (active is None or tp in active or tp in self._buffered_partitions):
                        continue
                    if tp.topic != self.intake_topic:
                        if tp.topic in self.changelog_topics and self.on_changelog is not None:
                            self.on_changelog(tp, fetched)
                        else:
                            await self._per_record(tp, fetched)
                        continue
                    last = read_offset.get(tp)
                    first = fetched[0].offset
                    if (last is None or first == last + 1) and (
                        fetched[-1].offset - first == len(fetched) - 1
                    ):
                        # The usual case: the offsets that follow, without gaps.
                        batch[tp.partition] = fetched
                        last = fetched[-1].offset
                    else:
                        fresh = []
                        for fragment in fetched:
                            offset = fragment.offset
                            if last is not None and offset < last:
                                continue  # handed over already
                            if last and offset - last > 1:
                                await self._add_gap(tp, last + 1, offset)
                            fresh.append(fragment)
                            last = offset
                        if fresh:
                            batch[tp.partition] = fresh
                    if last is not None:
                        read_offset[tp] = last
                if batch:
                    # A rebalance stops the flow: drop the fetch as Faust would; recovery seeks.
                    await self.wait_first(intake.put((generation, batch)), self.suspend_flow.wait())
                # No commit awaited here, as Faust's loop does after `broker_commit_every`
                # acks: the next fetch would wait for the broker's answer. `ack_records`
                # starts that commit beside this loop.
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                return
            raise

    def is_current(self, generation: int) -> bool:
        """Whether a fetch tagged `generation` was fetched since the last rebalance."""
        return bool(generation == self.app.consumer_generation_id)

    async def _per_record(self, tp: TP, fetched: Sequence[Any]) -> None:
        for record in fetched:
            message = self._to_message(tp, record)
            await self.wait_first(self.callback(message), self.suspend_flow.wait())
            self._read_offset[tp] = record.offset

    def ack_records(self, batch: ByPartition) -> None:
        """Mark intake records done, as Faust's `ack` does for each of its messages.

        Also tells Faust's monitor the stream took records from these partitions, as
        its per-record stream does: the consumer thread logs "Stream has not started
        processing" for a partition with lag whose monitor time is older than
        `stream_processing_timeout` (5 minutes).
        """
        assigned = self.assignment()
        inbound = self.app.monitor.stream_inbound_time
        now = time.monotonic()
        for partition in batch:
            inbound[TP(self.intake_topic, partition)] = now
        with ack_lock:
            for partition, fragments in batch.items():
                tp = TP(self.intake_topic, partition)
                if tp not in assigned:
                    continue  # revoked: Faust dropped its bookkeeping, the new owner rereads
                committed = self._committed_offset[tp]
                index = self._acked_index[tp]
                offsets = [fragment.offset for fragment in fragments]
                if not offsets:
                    continue
                if (committed is None or min(offsets) >= committed) and index.isdisjoint(offsets):
                    fresh = offsets  # the usual case: none acked or committed before
                else:
                    fresh = [
                        o
                        for o in offsets
                        if (committed is None or o >= committed) and o not in index
                    ]
                index.update(fresh)
                self._acked[tp].extend(fresh)
                self._n_acked += len(fresh)
            notify(self._waiting_for_ack)
        self._commit_if_due()

    def _commit_if_due(self) -> None:
        """Start a commit once `broker_commit_every` records are acked since the last one.

        Faust's loop awaits this commit before it fetches again, a broker round trip
        before the next fetch. Here it runs as a task of the consumer (a failure crashes
        it, as in Faust's loop), one at a time. Committing by count, not only every 2.8 s,
        bounds Faust's bookkeeping of acked offsets, which a commit walks without a turn
        of the event loop (100,000 offsets: about 12 ms).
        """
        every = self._commit_every
        if every is None or self._n_acked < every:
            return
        if self._counted_commit is not None and not self._counted_commit.done():
            return
        self._n_acked = 0
        self._counted_commit = self.add_future(self.commit())
