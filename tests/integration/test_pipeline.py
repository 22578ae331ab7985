"""Fragments in, complete records out: content, order, seq, dead letters and tombstones."""

from __future__ import annotations

import asyncio

from sessions_app.core.keys import buffer_key
from sessions_app.tools import harness
from sessions_app.tools.embedded_broker import create_topics_sync
from sessions_app.tools.loadgen import Session, Verification, generate, interleave

from .conftest import Deployment, partition_of

DELIMITER = b"\r\n"


def test_fragmented_sessions_come_out_whole_in_order_and_numbered(deployment: Deployment) -> None:
    sessions = generate("p", 60, 15, DELIMITER, seed=11)
    deployment.start_worker()
    deployment.produce([(key, fragment, None) for key, fragment in interleave(sessions, seed=11)])
    expected = {s.key: s.records for s in sessions}
    out = deployment.read("output", sum(len(r) for r in expected.values()))

    check = Verification(expected)
    for record in out:
        check.add(record.key, record.value, record.headers.get("seq"), 0)
    assert check.ok, check.summary()
    assert check.duplicates == 0
    for key, records in expected.items():
        mine = [r for r in out if r.key == key]
        # Byte for byte, in order, seq counting from 0, on the session's own partition.
        assert [r.value for r in mine] == records
        assert [r.headers["seq"] for r in mine] == [str(i).encode() for i in range(len(records))]
        assert {r.partition for r in mine} == {partition_of(key, deployment.partitions)}


def test_bad_fragments_go_to_the_dead_letter_topic_while_good_ones_flow(
    deployment: Deployment,
) -> None:
    """Null and empty keys, and a buffer the worker cannot read, go to the DLQ; the rest flows.

    The unreadable buffer is planted in the table's changelog, named as faust-streaming
    0.15.3 names it (APP_ID-session_buffers-changelog), under core/keys.py's buffer key:
    the only way in for a buffer the worker did not write.
    """
    # A buffer this version cannot read, left in the changelog by something else.
    changelog = f"{deployment.env['SESSIONS_APP_ID']}-session_buffers-changelog"
    create_topics_sync(deployment.broker.bootstrap, [changelog], deployment.partitions)
    deployment.produce_to(changelog, [(buffer_key(b"broken"), b"\x09not-a-buffer", 1)])

    good = [(b"good-0", b"one\r"), (b"good-1", b"two\r\n"), (b"good-0", b"\nthree\r\n")]
    deployment.produce(
        [
            (*good[0], 0),
            (None, b"no key", 0),
            (*good[1], 0),
            (b"", b"empty key", 0),
            (b"broken", b"more\r\n", 1),
            (*good[2], 0),
        ]
    )
    deployment.start_worker()
    out = deployment.read("output", 3)
    # good-0's first record completes only with its second fragment, after good-1's.
    assert [(r.key, r.value, r.headers["seq"]) for r in out] == [
        (b"good-1", b"two", b"0"),
        (b"good-0", b"one", b"0"),
        (b"good-0", b"three", b"1"),
    ]
    dead = deployment.read("dlq", 3)
    by_value = {r.value: r for r in dead}
    assert set(by_value) == {b"no key", b"empty key", b"more\r\n"}

    null_key = by_value[b"no key"]
    assert null_key.key is None
    assert null_key.headers["error.stage"] == b"validate"
    assert null_key.headers["error.class"] == b"InvalidSessionKey"
    assert b"null key" in null_key.headers["error.message"]
    assert null_key.headers["source.topic"] == deployment.topic("input").encode()
    assert null_key.headers["source.partition"] == b"0"
    assert null_key.headers["source.offset"] == b"1"
    assert by_value[b"empty key"].key == b""
    assert by_value[b"empty key"].headers["source.offset"] == b"3"

    broken = by_value[b"more\r\n"]
    assert broken.key == b"broken"
    assert broken.headers["error.stage"] == b"state"
    assert broken.headers["error.class"] == b"CorruptSessionState"
    assert (broken.headers["source.partition"], broken.headers["source.offset"]) == (b"1", b"0")


def test_tombstone_closes_the_session_and_flushes_its_tail(deployment: Deployment) -> None:
    deployment.start_worker()
    p = partition_of(b"s", deployment.partitions)
    deployment.produce(
        [(b"s", b"abc\r\nrem", p), (b"s", b"nant", p), (b"s", None, p), (b"s", b"new\r\n", p)]
    )
    out = deployment.read("output", 2)
    assert [(r.value, r.headers["seq"]) for r in out] == [(b"abc", b"0"), (b"new", b"0")]
    (expired,) = deployment.read("expired", 1)
    assert (expired.key, expired.value, expired.partition) == (b"s", b"remnant", p)
    assert expired.headers["reason"] == b"closed"
    assert deployment.workers[0].stats()["totals"]["sessions_closed"] == 1


def split_unfinished(session: Session, delimiter: bytes) -> tuple[Session, Session]:
    """Split a session's fragments in two, the first part ending inside a record."""
    cut = len(session.fragments) // 2
    while b"".join(session.fragments[:cut]).endswith(delimiter) or cut == 0:
        cut += 1
    head = Session(session.key, [], session.fragments[:cut])
    return head, Session(session.key, [], session.fragments[cut:])


def test_a_handover_keeps_partitions_buffers_and_uncommitted_input(deployment: Deployment) -> None:
    """Records come out whole on their input's partition after a handover to an empty worker.

    With the default delimiter (\\n), sessions are sent to a partition other than their
    key's hash partition. The first worker takes the first part of the sessions of
    partitions 0-2, each ending inside a record, and stops: it committed 0-2, and
    partition 3 had nothing to commit. Then the rest arrives, 60,000 small fragments
    among it, and a second worker with an empty data dir takes over: it rebuilds the
    buffers from the changelog and finishes the records begun on the first, reads
    partition 3, which never committed, from its start, and applies the backlog in
    batches of at most SESSIONS_BATCH_FRAGMENTS.
    """
    del deployment.env["SESSIONS_DELIMITER"]
    deployment.env["SESSIONS_BATCH_FRAGMENTS"] = "10000"
    n = deployment.partitions
    sessions = generate("h", 80, 6, b"\n", seed=13)
    target = {s.key: (partition_of(s.key, n) + 1) % n for s in sessions}
    early = [s for s in sessions if target[s.key] != 3]
    late = [s for s in sessions if target[s.key] == 3]
    assert early and late
    heads, tails = zip(*(split_unfinished(s, b"\n") for s in early), strict=True)

    def sent(part: list[Session]) -> list[harness.Item]:
        return [(key, fragment, target[key]) for key, fragment in interleave(part, seed=13)]

    first = deployment.start_worker("w1")
    deployment.produce(sent(list(heads)))
    first.wait_for("fragments_consumed", sum(len(s.fragments) for s in heads))
    first.stop()
    committed = asyncio.run(
        harness.committed_offsets(
            deployment.broker.bootstrap,
            deployment.env["SESSIONS_APP_ID"],
            deployment.topic("input"),
            n,
        )
    )
    assert committed[3] is None and None not in [committed[p] for p in range(3)], committed

    bulk: list[harness.Item] = []
    for _ in range(600):
        bulk += [(f"bulk-{i}".encode(), b"x", None) for i in range(100)]
    deployment.produce(sent(list(tails) + late) + bulk)
    second = deployment.start_worker("w2")
    deployment.produce([(f"bulk-{i}".encode(), b"\n", None) for i in range(100)])

    check = deployment.verify(sessions)
    assert check.ok, check.summary() + second.log()[-3000:]
    out = deployment.read("output", check.received + 100)
    for record in out:
        if record.key in target:
            assert record.partition == target[record.key] != partition_of(record.key, n)
    bulk_out = [r for r in out if r.key not in target]
    assert sorted((r.key, r.value, r.headers["seq"]) for r in bulk_out) == sorted(
        (f"bulk-{i}".encode(), b"x" * 600, b"0") for i in range(100)
    )
    stats = second.wait_for("fragments_consumed", len(bulk) + 100)
    assert stats["largest_batch_fragments"] <= 10_000, stats
    assert stats["totals"]["batches_applied"] >= 7, stats
