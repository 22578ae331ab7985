"""Fragments in, complete records out: content, order, seq, dead letters and tombstones."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner

from sessions_app.core.keys import buffer_key
from sessions_app.core.session_state import SessionState
from sessions_app.tools.embedded_broker import create_topics_sync
from sessions_app.tools.loadgen import Verification, generate, interleave

from .conftest import Deployment

DELIMITER = b"\r\n"


def partition_of(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for `key`."""
    return int(DefaultPartitioner()(key, list(range(partitions)), list(range(partitions))))


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
    assert deployment.workers[0].stats()["totals"]["sessions_closed"] == 1  # type: ignore[index]


def test_stored_buffer_layout_is_what_the_changelog_holds(deployment: Deployment) -> None:
    deployment.start_worker()
    deployment.produce([(b"k", b"rec\r\npart", 2)])
    deployment.read("output", 1)
    changelog = f"{deployment.env['SESSIONS_APP_ID']}-session_buffers-changelog"
    deployment.env["SESSIONS_CHANGELOG_TOPIC"] = changelog
    (entry,) = [r for r in deployment.read("changelog", 2) if r.key == buffer_key(b"k")]
    state = SessionState.decode(entry.value or b"")
    assert (entry.key, entry.partition) == (buffer_key(b"k"), 2)
    assert (state.applied_offset, state.next_seq, state.pending) == (0, 1, b"part")
