"""Producer plumbing: records handed to aiokafka's producer in batches, and their acknowledgements.

Faust's and aiokafka's `send()` cost a coroutine, a future and a batch lookup
per record. The pipeline's records go into the producer's batches directly,
a batch per SESSIONS_PRODUCER_MAX_BATCH_SIZE bytes, in order per partition,
and one future per batch says when the broker has them.

aiokafka's `create_batch` and `send_batch` are public; `_ensure_producer`
(Faust's aiokafka producer) is checked against faust-streaming 0.15.3.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sessions_app.core.batch import DeadLetter, OutRecord
from sessions_app.core.limits import KAFKA_DEFAULT_MAX_MESSAGE_BYTES, RECORD_OVERHEAD

#: (key, value, headers) of one record to produce.
Outgoing = tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes]]]
#: Records for one (topic name, partition), in order.
Send = tuple[tuple[str, int], list[Outgoing]]
#: Records per (topic name, partition), each list in order.
Sends = dict[tuple[str, int], list[Outgoing]]


@dataclass
class InFlight:
    """Records handed to the producer, in order per partition, not yet known to be in."""

    batches: list[tuple[tuple[str, int], int, Any]] = field(default_factory=list)
    singles: list[Any] = field(default_factory=list)
    #: Once delivered: each (topic, partition)'s first offset.
    first: dict[tuple[str, int], int] = field(default_factory=dict)

    async def delivered(self) -> dict[tuple[str, int], int]:
        """Wait until the broker has every record; return each (topic, partition)'s last offset."""
        acked = await asyncio.gather(*(future for _, _, future in self.batches))
        await asyncio.gather(*self.singles)
        last: dict[tuple[str, int], int] = {}
        for (where, count, _), metadata in zip(self.batches, acked, strict=True):
            last[where] = max(last.get(where, -1), metadata.offset + count - 1)
            self.first[where] = min(self.first.get(where, metadata.offset), metadata.offset)
        return last


class Delivery:
    """Hands records to the app's producer and says when the broker has them."""

    def __init__(self, app: Any, dead_letter_topic: Any) -> None:
        self._app = app
        self._dead_letter_topic = dead_letter_topic
        #: The dead-letter topic's max.message.bytes, once the worker has read it at start.
        self.dead_letter_limit = KAFKA_DEFAULT_MAX_MESSAGE_BYTES

    async def hand_over(self, sends: Iterable[Send]) -> InFlight:
        """Hand (key, value, headers) lists for their (topic, partition) to the producer.

        One (topic, partition) at a time, in the order given, the event loop let in between.
        """
        producer = self._app.producer._ensure_producer()
        in_flight = InFlight()
        for (topic, partition), records in sends:
            batch, count = producer.create_batch(), 0
            for key, value, header_items in records:
                headers = list(header_items)  # the record builder takes a list only
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    future = await producer.send_batch(batch, topic, partition=partition)
                    in_flight.batches.append(((topic, partition), count, future))
                    batch, count = producer.create_batch(), 0
                    # An empty batch takes any one record, whatever the size limit.
                    batch.append(key=key, value=value, timestamp=None, headers=headers)
                count += 1
            if count:
                batch.close()
                future = await producer.send_batch(batch, topic, partition=partition)
                in_flight.batches.append(((topic, partition), count, future))
            # send_batch rarely suspends: let timers and the web view in between partitions.
            await asyncio.sleep(0)
        return in_flight

    async def send(
        self,
        outputs: Iterable[tuple[Any, int, Sequence[OutRecord]]],
        dead_letters: Sequence[DeadLetter] = (),
    ) -> InFlight:
        """Hand records for their topics and partitions, and dead letters, to the producer."""
        sends: Sends = {}
        for topic, partition, records in outputs:
            if records:
                # An OutRecord is a (key, value, headers) tuple already.
                sends.setdefault((topic.get_topic_name(), partition), []).extend(records)
        producer = self._app.producer
        dlq = self._dead_letter_topic.get_topic_name()
        # Dead letters go where the key's partitioner puts them: one send each, they are rare.
        letters = []
        for letter in dead_letters:
            value, headers = self._fitting(letter)
            # Faust's producer: topic, key, value, partition, timestamp, headers.
            letters.append(
                await producer.send(dlq, letter.fragment.key, value, None, None, headers)
            )
        in_flight = await self.hand_over(sends.items())
        in_flight.singles = letters
        return in_flight

    def _fitting(self, letter: DeadLetter) -> tuple[bytes | None, list[tuple[str, bytes]]]:
        """Return a dead letter's value and headers, the value cut to fit the topic's limit.

        A fragment Kafka took on the input topic may not fit the dead-letter topic with the
        error headers added: its head goes, with `error.value.bytes` saying how long it was.
        """
        value, headers = letter.fragment.value, list(letter.headers())
        key = letter.fragment.key or b""
        room = self.dead_letter_limit - RECORD_OVERHEAD - len(key)
        room -= sum(len(name) + len(data) + 10 for name, data in headers) + 40
        if value is not None and len(value) > room:
            headers.append(("error.value.bytes", str(len(value)).encode()))
            value = value[: max(room, 0)]
        return value, headers

    async def deliver(self, outputs: Iterable[tuple[Any, int, Sequence[OutRecord]]]) -> None:
        """Send records to their topics and partitions and wait until the broker has them."""
        await (await self.send(outputs)).delivered()

    async def publish(self, topic: Any, key: bytes, value: bytes) -> None:
        """Send one record where its key's partitioner puts it, and wait until it is in."""
        await self._app.producer.send_and_wait(topic.get_topic_name(), key, value, None, None, None)
