"""Load generator and verifier: sessions of random binary records, sent in random fragments.

`produce` writes a manifest (JSON lines) of every record it sent; `verify`
reads the output topic and checks it against the manifest: every record
present, byte for byte, in `seq` order, with repeats counted. The pure parts
(generation, fragmenting, checking) are importable without a broker.
"""

from __future__ import annotations

import base64
import itertools
import json
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sessions_app.core.reassembly import frame, is_unambiguous
from sessions_app.tools.harness import Record, read_topic, send


def random_record(rng: random.Random, delimiter: bytes, min_len: int, max_len: int) -> bytes:
    """Return random bytes that frame unambiguously with `delimiter`."""
    while True:
        record = rng.randbytes(rng.randint(min_len, max_len)).replace(delimiter, b"")
        if is_unambiguous(record, delimiter):
            return record


def cut_fragments(
    stream: bytes, delimiter: bytes, rng: random.Random, max_fragments: int
) -> list[bytes]:
    """Cut a byte stream into 1..max_fragments pieces per record, some inside delimiters."""
    cuts: set[int] = set()
    start = 0
    while (at := stream.find(delimiter, start)) >= 0:
        end = at + len(delimiter)
        pieces = rng.randint(1, max_fragments)
        for _ in range(pieces - 1):
            cuts.add(rng.randint(start + 1, end - 1) if end - start > 1 else end)
        if len(delimiter) > 1 and rng.random() < 0.3:
            cuts.add(rng.randint(at + 1, end - 1))
        cuts.add(end)
        start = end
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(stream)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds) if b > a]


@dataclass
class Session:
    """One generated session: its key, records and the fragments that carry them."""

    key: bytes
    records: list[bytes]
    fragments: list[bytes]


def generate(
    run_id: str,
    sessions: int,
    records: int,
    delimiter: bytes,
    seed: int,
    min_len: int = 40,
    max_len: int = 160,
    max_fragments: int = 3,
) -> list[Session]:
    """Generate `sessions` sessions of `records` records each."""
    rng = random.Random(seed)
    result = []
    for n in range(sessions):
        recs = [random_record(rng, delimiter, min_len, max_len) for _ in range(records)]
        frags = cut_fragments(frame(recs, delimiter), delimiter, rng, max_fragments)
        result.append(Session(f"{run_id}-{n:07d}".encode(), recs, frags))
    return result


def interleave(sessions: list[Session], seed: int) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, fragment) with sessions interleaved at random, each session in order."""
    rng = random.Random(seed ^ 0x5EED)
    active = [(s, iter(s.fragments)) for s in sessions if s.fragments]
    while active:
        i = rng.randrange(len(active))
        session, fragments = active[i]
        fragment = next(fragments, None)
        if fragment is None:
            active[i] = active[-1]
            active.pop()
        else:
            yield session.key, fragment


def write_manifest(
    path: Path, run_id: str, delimiter: bytes, sessions: list[Session], started: float
) -> None:
    """Write what was sent: a header line, then one line per session with its records."""
    with path.open("w") as out:
        header = {
            "run_id": run_id,
            "delimiter": delimiter.hex(),
            "sessions": len(sessions),
            "records": sum(len(s.records) for s in sessions),
            "fragments": sum(len(s.fragments) for s in sessions),
            "started": started,
        }
        out.write(json.dumps(header) + "\n")
        for s in sessions:
            line = {
                "session": base64.b64encode(s.key).decode(),
                "records": [base64.b64encode(r).decode() for r in s.records],
            }
            out.write(json.dumps(line) + "\n")


def read_manifest(path: Path) -> tuple[dict[str, Any], dict[bytes, list[bytes]]]:
    """Return the manifest's header and each session's records."""
    with path.open() as src:
        header = json.loads(src.readline())
        expected = {}
        for line in src:
            entry = json.loads(line)
            expected[base64.b64decode(entry["session"])] = [
                base64.b64decode(r) for r in entry["records"]
            ]
    return header, expected


@dataclass
class Verification:
    """Checks output records against the manifest as they arrive."""

    expected: dict[bytes, list[bytes]]
    seen: dict[bytes, set[int]] = field(default_factory=dict)
    received: int = 0
    duplicates: int = 0
    #: Records of sessions the manifest does not hold (another run's, or a mangled key).
    foreign: int = 0
    corrupt: list[str] = field(default_factory=list)
    out_of_order: list[str] = field(default_factory=list)
    last_timestamp_ms: int = 0

    def add(
        self, key: bytes | None, value: bytes | None, seq_header: bytes | None, timestamp_ms: int
    ) -> None:
        """Check one output record; records of other sessions are ignored."""
        if key not in self.expected:
            self.foreign += 1
            return
        self.received += 1
        self.last_timestamp_ms = max(self.last_timestamp_ms, timestamp_ms)
        records = self.expected[key]
        try:
            seq = int(seq_header or b"")
        except ValueError:
            self.corrupt.append(f"{key!r}: seq header {seq_header!r} is not a number")
            return
        if not 0 <= seq < len(records):
            self.corrupt.append(f"{key!r}: seq {seq} outside 0..{len(records) - 1}")
            return
        if value != records[seq]:
            self.corrupt.append(
                f"{key!r} seq {seq}: {len(value or b'')} bytes differ from the record sent"
            )
        seen = self.seen.setdefault(key, set())
        if seq in seen:
            self.duplicates += 1
        elif seq != len(seen):
            # Records of a session arrive in seq order; a repeat may rewind, never skip.
            self.out_of_order.append(f"{key!r}: seq {seq} arrived before seq {len(seen)}")
        seen.add(seq)

    @property
    def expected_count(self) -> int:
        return sum(len(r) for r in self.expected.values())

    @property
    def unique(self) -> int:
        return sum(len(s) for s in self.seen.values())

    @property
    def complete(self) -> bool:
        return self.unique == self.expected_count

    @property
    def ok(self) -> bool:
        return self.complete and not self.corrupt and not self.out_of_order

    def summary(self) -> str:
        """Return a human summary, one fact per line."""
        lines = [
            f"expected records:  {self.expected_count}",
            f"received:          {self.received} ({self.duplicates} repeats by seq)",
            f"other sessions:    {self.foreign}",
            f"missing:           {self.expected_count - self.unique}",
            f"corrupt:           {len(self.corrupt)}",
            f"out of order:      {len(self.out_of_order)}",
        ]
        lines += [f"  corrupt: {c}" for c in self.corrupt[:10]]
        lines += [f"  out of order: {c}" for c in self.out_of_order[:10]]
        lines.append("OK" if self.ok else "FAILED")
        return "\n".join(lines)


async def produce(
    bootstrap: list[str],
    topic: str,
    sessions: list[Session],
    seed: int,
    progress: bool = True,
    client_options: Mapping[str, Any] | None = None,
) -> tuple[int, float]:
    """Send every session's fragments, interleaved; return (fragments, seconds).

    `client_options` are further Kafka client arguments, such as the TLS and SASL ones of
    Settings.kafka_client_options().
    """
    from tqdm import tqdm

    total = sum(len(s.fragments) for s in sessions)
    items = ((key, fragment, None) for key, fragment in interleave(sessions, seed))
    with tqdm(total=total, unit="frag", disable=not progress, mininterval=0.5) as bar:
        seconds = await send(bootstrap, topic, items, progress=bar.update, options=client_options)
    return total, seconds


async def verify(
    bootstrap: list[str],
    topic: str,
    check: Verification,
    idle_timeout: float,
    settle: float = 1.0,
    client_options: Mapping[str, Any] | None = None,
) -> Verification:
    """Read `topic` from the start until all records are in, or none came for idle_timeout.

    Once all are in, reading goes on until none came for `settle` seconds, so repeats
    still in flight are counted too. `client_options` as for `produce`.
    """
    checked = 0

    def complete(records: list[Record]) -> bool:
        nonlocal checked
        for record in records[checked:]:
            check.add(record.key, record.value, record.headers.get("seq"), record.timestamp)
        checked = len(records)
        return check.complete

    await read_topic(
        bootstrap,
        topic,
        complete,
        settle=settle,
        idle_timeout=idle_timeout,
        options=client_options,
    )
    return check
