"""Applying a partition's batch of fragments to stored buffers, without a broker."""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from sessions_app.core.batch import (
    INLINE_LIMIT,
    ActivityClock,
    BatchResult,
    Fragment,
    OutRecord,
    PartitionBatch,
    apply_fragments,
    pending_of,
)
from sessions_app.core.session_state import SessionState

NL = b"\n"


class Buffers(dict[bytes, bytes]):
    """Stored buffers as the agent keeps them: session ID -> encoded SessionState, and chunks."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.chunks: dict[tuple[bytes, int], bytes] = {}

    def load_chunks(self, session_id: bytes, indices: list[int]) -> list[bytes]:
        return [self.chunks[(session_id, index)] for index in indices]

    def store(self, result: BatchResult) -> None:
        """Write what a batch produced, as the pipeline's RocksDB write does."""
        for key, state in result.writes.items():
            if state is None:
                self.pop(key, None)
            else:
                self[key] = state.encode()
        for where, chunk in result.chunks.items():
            if chunk is None:
                self.chunks.pop(where, None)
            else:
                self.chunks[where] = chunk

    def apply(self, fragments: list[Fragment], delimiter: bytes = NL):  # type: ignore[no-untyped-def]
        result = apply_fragments(
            fragments, self.get, delimiter, now_us=1_000, load_chunks=self.load_chunks
        )
        self.store(result)
        return result


def frag(offset: int, key: bytes | None, value: bytes | None) -> Fragment:
    return Fragment("in", 3, offset, key, value)


def test_records_get_seq_in_order_across_batches() -> None:
    buffers = Buffers()
    first = buffers.apply([frag(0, b"s", b"a\nb"), frag(1, b"s", b"c\n")])
    second = buffers.apply([frag(2, b"s", b"d\ne")])
    out = [(r.value, dict(r.headers)["seq"]) for r in first.records + second.records]
    assert out == [(b"a", b"0"), (b"bc", b"1"), (b"d", b"2")]
    assert SessionState.decode(buffers[b"s"]) == SessionState(2, 3, 1_000, b"e")


def test_replayed_fragments_are_not_applied_twice() -> None:
    buffers = Buffers()
    fragments = [frag(10, b"s", b"ab"), frag(11, b"s", b"c\nd")]
    buffers.apply(fragments)
    replay = buffers.apply([*fragments, frag(12, b"s", b"e\n")])
    assert replay.fragments_replayed == 2
    assert [r.value for r in replay.records] == [b"de"]
    assert dict(replay.records[0].headers)["seq"] == b"1"


def test_fragments_at_or_below_the_watermark_are_skipped_even_without_a_session() -> None:
    # Session "gone" was closed after offset 7 was applied; its fragments come again.
    result = apply_fragments(
        [frag(6, b"gone", b"a\n"), frag(7, b"gone", b"b"), frag(8, b"new", b"c\n")],
        Buffers().get,
        NL,
        now_us=0,
        applied_through=7,
    )
    assert [r.value for r in result.records] == [b"c"]
    assert (result.fragments_replayed, result.applied_through) == (2, 8)
    assert b"gone" not in result.writes


def test_tombstone_closes_the_session_and_flushes_its_tail() -> None:
    buffers = Buffers()
    result = buffers.apply(
        [frag(0, b"s", b"x\ntail"), frag(1, b"s", None), frag(2, b"s", b"new\n")]
    )
    assert [r.value for r in result.expired] == [b"tail"]
    assert dict(result.expired[0].headers) == {"reason": b"closed", "seq": b"1"}
    # A fragment after the tombstone starts a new session at seq 0.
    assert [(r.value, dict(r.headers)["seq"]) for r in result.records] == [
        (b"x", b"0"),
        (b"new", b"0"),
    ]
    assert result.sessions_closed == 1


def test_tombstone_without_pending_bytes_or_session_sends_nothing() -> None:
    buffers = Buffers()
    result = buffers.apply([frag(0, b"s", b"x\n"), frag(1, b"s", None), frag(2, b"t", None)])
    assert result.expired == []
    assert b"s" not in buffers and b"t" not in buffers
    assert result.writes == {b"s": None}


def test_bad_keys_go_to_the_dead_letters_and_the_rest_flows() -> None:
    buffers = Buffers()
    result = buffers.apply(
        [frag(0, b"s", b"a\n"), frag(1, None, b"x"), frag(2, b"", b"y"), frag(3, b"s", b"b\n")]
    )
    assert [r.value for r in result.records] == [b"a", b"b"]
    letters = [(dl.fragment.offset, dict(dl.headers())) for dl in result.dead_letters]
    assert [offset for offset, _ in letters] == [1, 2]
    headers = letters[0][1]
    assert headers["error.stage"] == b"validate"
    assert headers["error.class"] == b"InvalidSessionKey"
    assert b"null key" in headers["error.message"]
    assert b"empty key" in letters[1][1]["error.message"]
    assert (headers["source.topic"], headers["source.partition"], headers["source.offset"]) == (
        b"in",
        b"3",
        b"1",
    )


def test_unreadable_stored_buffer_dead_letters_the_fragment() -> None:
    buffers = Buffers({b"bad": b"not a buffer"})
    result = buffers.apply([frag(5, b"bad", b"x\n"), frag(6, b"ok", b"y\n")])
    assert [r.value for r in result.records] == [b"y"]
    (letter,) = result.dead_letters
    assert dict(letter.headers())["error.stage"] == b"state"
    assert dict(letter.headers())["error.class"] == b"CorruptSessionState"
    assert buffers[b"bad"] == b"not a buffer"


def test_a_fragment_reassembly_fails_on_is_dead_lettered_and_the_batch_flows() -> None:
    """A value cut_records cannot take (Kafka gives bytes; here a str) fails at `reassemble`."""
    buffers = Buffers()
    bad = Fragment("in", 3, 1, b"s", "not bytes")  # type: ignore[arg-type]
    result = buffers.apply(
        [frag(0, b"s", b"a\nb"), bad, frag(2, b"s", b"c\n"), frag(3, b"t", b"d\n")]
    )
    # The session goes on from its state before the bad fragment: "b" + "c" is its record.
    assert [(r.key, r.value, dict(r.headers)["seq"]) for r in result.records] == [
        (b"s", b"a", b"0"),
        (b"s", b"bc", b"1"),
        (b"t", b"d", b"0"),
    ]
    (letter,) = result.dead_letters
    headers = dict(letter.headers())
    assert letter.fragment == bad
    assert (headers["error.stage"], headers["error.class"]) == (b"reassemble", b"TypeError")
    assert headers["error.message"]
    assert (headers["source.partition"], headers["source.offset"]) == (b"3", b"1")
    assert result.applied_through == 3
    assert SessionState.decode(buffers[b"s"]).applied_offset == 2


def test_multi_byte_delimiter_split_between_fragments() -> None:
    buffers = Buffers()
    result = buffers.apply(
        [frag(0, b"s", b"one\r"), frag(1, b"s", b"\ntwo\r"), frag(2, b"s", b"\n")], b"\r\n"
    )
    assert [r.value for r in result.records] == [b"one", b"two"]


def test_overflowing_buffer_is_flushed_and_the_session_goes_on() -> None:
    buffers = Buffers()
    result = apply_fragments(
        [frag(0, b"s", b"a" * 60), frag(1, b"s", b"b" * 60), frag(2, b"s", b"c" * 30 + b"\n")],
        buffers.get,
        NL,
        now_us=0,
        max_buffer_bytes=100,
    )
    # The 120 pending bytes go out in heads of at most the cap, in order.
    assert [(r.value, dict(r.headers)) for r in result.expired] == [
        (b"a" * 60 + b"b" * 40, {"reason": b"overflow", "seq": b"0"}),
        (b"b" * 20, {"reason": b"overflow", "seq": b"0"}),
    ]
    assert [(r.value, dict(r.headers)["seq"]) for r in result.records] == [(b"c" * 30, b"0")]
    assert result.overflows == 1


def test_a_record_longer_than_the_cap_goes_out_in_pieces_none_longer_than_the_cap() -> None:
    # One large fragment holds a whole record of 250 bytes, a cap of 100.
    record = bytes(range(250))
    result = apply_fragments(
        [frag(0, b"s", record + b"\r\n" + b"tail")],
        Buffers().get,
        b"\r\n",
        now_us=0,
        max_buffer_bytes=100,
    )
    heads = [r.value for r in result.expired]
    assert heads == [record[:100], record[100:200]]
    assert {dict(r.headers)["reason"] for r in result.expired} == {b"overflow"}
    assert [(r.value, dict(r.headers)["seq"]) for r in result.records] == [(record[200:], b"0")]
    assert b"".join(heads) + result.records[0].value == record
    assert result.writes[b"s"] is not None and result.writes[b"s"].pending == b"tail"


def test_a_session_id_longer_than_kafka_can_carry_is_dead_lettered() -> None:
    result = Buffers().apply([frag(0, b"k" * 1025, b"x\n"), frag(1, b"k" * 1024, b"y\n")])
    (letter,) = result.dead_letters
    assert letter.fragment.offset == 0
    assert dict(letter.headers())["error.stage"] == b"validate"
    assert b"1,025 bytes" in dict(letter.headers())["error.message"]
    assert [r.value for r in result.records] == [b"y"]


def test_reject_refuses_new_sessions_beyond_what_may_open() -> None:
    buffers = Buffers({b"old": SessionState().encode()})
    result = apply_fragments(
        [
            frag(0, b"a", b"x\n"),
            frag(1, b"b", b"y\n"),
            frag(2, b"old", b"z\n"),
            frag(3, b"a", None),
            frag(4, b"c", b"w\n"),
        ],
        buffers.get,
        NL,
        now_us=0,
        may_open=1,
    )
    # a opens (1 of 1), b is refused, old is no new session, a closes, then c may open.
    assert [r.key for r in result.records] == [b"a", b"old", b"c"]
    (letter,) = result.dead_letters
    assert letter.fragment.key == b"b"
    assert dict(letter.headers())["error.stage"] == b"capacity"
    assert result.live_delta == 1


def test_a_flush_at_the_byte_cap_never_splits_a_multi_byte_delimiter() -> None:
    # The cap is passed with "\r" as the last byte: it may begin the delimiter "\r\n".
    result = apply_fragments(
        [frag(0, b"s", b"a" * 100 + b"\r"), frag(1, b"s", b"\nnext\r\n")],
        Buffers().get,
        b"\r\n",
        now_us=0,
        max_buffer_bytes=100,
    )
    assert [(r.value, dict(r.headers)) for r in result.expired] == [
        (b"a" * 100, {"reason": b"overflow", "seq": b"0"})
    ]
    assert [(r.value, dict(r.headers)["seq"]) for r in result.records] == [
        (b"", b"0"),
        (b"next", b"1"),
    ]


# --- properties of the batch core ---------------------------------------------------------

SESSION_IDS = (b"s1", b"s2", b"s3")


@st.composite
def traffic(draw: st.DrawFn) -> tuple[bytes, dict[bytes, bytes], list[Fragment]]:
    """A delimiter, each session's whole byte stream, and those streams cut into fragments.

    Streams are built from the delimiter's own bytes, so delimiters, split ones and
    self-overlapping matches (b"aa" in b"aaa") are common; fragments of different
    sessions are interleaved, each session's in order.
    """
    delimiter = draw(
        st.sampled_from([b"\n", b"\r\n", b"aa", b"aba", b"abab"])
        | st.binary(min_size=1, max_size=4)
    )
    alphabet = sorted(set(delimiter) | {ord("x")})
    piece = st.sampled_from([delimiter, delimiter[:1], delimiter[1:] or delimiter]) | st.lists(
        st.sampled_from(alphabet), max_size=6
    ).map(bytes)
    streams: dict[bytes, bytes] = {}
    queues: list[list[bytes]] = []
    for session_id in SESSION_IDS[: draw(st.integers(1, len(SESSION_IDS)))]:
        stream = b"".join(draw(st.lists(piece, max_size=12)))
        streams[session_id] = stream
        cuts = sorted(draw(st.sets(st.integers(1, max(len(stream) - 1, 1)), max_size=8)))
        bounds = [0, *(c for c in cuts if c < len(stream)), len(stream)]
        queues.append([session_id + b"|" + stream[a:b] for a, b in itertools.pairwise(bounds)])
    order = draw(st.permutations([i for i, queue in enumerate(queues) for _ in queue]))
    fragments = []
    for offset, index in enumerate(order):
        session_id, _, value = queues[index].pop(0).partition(b"|")
        fragments.append(frag(offset, session_id, value))
    return delimiter, streams, fragments


def run(
    batches: list[list[Fragment]], delimiter: bytes, cap: int | None, inline: int = INLINE_LIMIT
) -> tuple[list[OutRecord], list[OutRecord], dict[bytes, SessionState], int]:
    """Apply batches in turn to one partition's buffers and watermark, as the pipeline does.

    The states come back with all their pending bytes inline, chunks read back: how they
    were stored is the store's business, what they hold is the property's.
    """
    buffers = Buffers()
    watermark = -1
    records: list[OutRecord] = []
    expired: list[OutRecord] = []
    for batch in batches:
        result = apply_fragments(
            batch,
            buffers.get,
            delimiter,
            now_us=0,
            max_buffer_bytes=cap,
            applied_through=watermark,
            load_chunks=buffers.load_chunks,
            inline_limit=inline,
        )
        buffers.store(result)
        watermark = result.applied_through
        records += result.records
        expired += result.expired
    stored = {key: SessionState.decode(raw) for key, raw in buffers.items()}
    # No chunk outlives its session or lies beyond the ones its buffer names.
    assert all(index < stored[key].chunks for key, index in buffers.chunks), "orphan chunks"
    states = {
        key: SessionState(
            state.applied_offset, state.next_seq, 0, pending_of(key, state, {}, buffers.load_chunks)
        )
        for key, state in stored.items()
    }
    return records, expired, states, watermark


def split(fragments: list[Fragment], cuts: list[int]) -> list[list[Fragment]]:
    bounds = [0, *sorted({c % (len(fragments) + 1) for c in cuts}), len(fragments)]
    return [fragments[a:b] for a, b in itertools.pairwise(bounds)]


caps = st.none() | st.integers(min_value=1, max_value=12)
#: Pending bytes kept inline before chunks: the default, and small enough to chunk often.
inlines = st.sampled_from([INLINE_LIMIT, 0, 1, 2, 5])
EDGE_CASES = [
    (b"\r\n", {b"s1": b"a" * 100 + b"\r\nnext\r\n"}, [100, 101], 100),
    (b"\r\n", {b"s1": b"ab\r\ncd\r"}, [2, 3, 6], 1),
    (b"aa", {b"s1": b"xaaaxa" + b"a" * 5}, [1, 2, 3, 5], 1),
    (b"aba", {b"s1": b"ababa" + b"xab" + b"aba"}, [1, 3, 4, 7], 2),
]


def with_edge_cases(**more: Any) -> Any:
    """Pin EDGE_CASES as examples: one session's stream cut at the given offsets."""

    def decorate(test: Any) -> Any:
        for delimiter, streams, cuts, cap in EDGE_CASES:
            (stream,) = streams.values()
            bounds = itertools.pairwise([0, *cuts, len(stream)])
            fragments = [frag(i, b"s1", stream[a:b]) for i, (a, b) in enumerate(bounds)]
            test = example(case=(delimiter, streams, fragments), cap=cap, **more)(test)
        return test

    return decorate


@settings(max_examples=400, deadline=None)
@with_edge_cases(inline=INLINE_LIMIT)
@given(traffic(), caps, inlines)
def test_records_out_are_the_stream_cut_at_the_delimiter_and_flushes_lose_nothing(
    case: tuple[bytes, dict[bytes, bytes], list[Fragment]], cap: int | None, inline: int
) -> None:
    delimiter, streams, fragments = case
    records, expired, states, _ = run([fragments], delimiter, cap, inline)
    for session_id, stream in streams.items():
        *whole, tail = stream.split(delimiter)
        emitted = [r for r in records if r.key == session_id]
        assert [dict(r.headers)["seq"] for r in emitted] == [b"%d" % i for i in range(len(whole))]
        heads: dict[int, bytes] = {}
        for r in expired:
            if r.key == session_id:
                assert dict(r.headers)["reason"] == b"overflow"
                seq = int(dict(r.headers)["seq"])
                heads[seq] = heads.get(seq, b"") + r.value
        # Expired heads plus the emitted tail give each whole record, byte for byte.
        assert [heads.get(i, b"") + r.value for i, r in enumerate(emitted)] == whole
        state = states.get(session_id)
        pending = b"" if state is None else state.pending
        assert heads.get(len(whole), b"") + pending == tail
        if state is not None:
            assert state.next_seq == len(whole)
        if cap is not None:
            # Nothing stored or sent outgrows the cap (but for bytes that may begin a
            # delimiter): what Kafka's record size limit is checked against at start.
            assert len(pending) <= max(cap, len(delimiter) - 1)
            assert all(len(r.value) <= cap for r in [*emitted, *expired])


@settings(max_examples=300, deadline=None)
@with_edge_cases(cuts=[1, 2], inline=1)
@given(traffic(), caps, st.lists(st.integers(min_value=0), max_size=6), inlines)
def test_any_split_into_batches_gives_the_same_outputs_and_states(
    case: tuple[bytes, dict[bytes, bytes], list[Fragment]],
    cap: int | None,
    cuts: list[int],
    inline: int,
) -> None:
    delimiter, _, fragments = case
    split_up = run(split(fragments, cuts), delimiter, cap, inline)
    assert split_up == run([fragments], delimiter, cap, inline)
    # Chunked or inline, sessions hold the same bytes and send the same records.
    assert split_up == run([fragments], delimiter, cap, INLINE_LIMIT * 1024)


@settings(max_examples=300, deadline=None)
@given(traffic(), caps, st.lists(st.tuples(st.integers(0), st.integers(0)), max_size=4), inlines)
def test_redelivered_offsets_are_applied_once_and_emit_nothing_new(
    case: tuple[bytes, dict[bytes, bytes], list[Fragment]],
    cap: int | None,
    rewinds: list[tuple[int, int]],
    inline: int,
) -> None:
    delimiter, _, fragments = case
    # After each batch, a crash or rebalance rewinds the input to an earlier offset.
    batches: list[list[Fragment]] = []
    position = 0
    for step, back in rewinds:
        end = min(position + step % 7 + 1, len(fragments))
        batches.append(fragments[position:end])
        position = end - back % (end + 1)
    batches.append(fragments[position:])
    assert run(batches, delimiter, cap, inline) == run([fragments], delimiter, cap, inline)


@settings(max_examples=300, deadline=None)
@given(
    traffic(),
    caps,
    st.lists(st.integers(min_value=0), max_size=6),
    inlines,
    st.none() | st.integers(0, 3),
    st.lists(st.integers(min_value=0), max_size=3),
    st.integers(min_value=0),
)
def test_a_batch_applied_in_slices_gives_what_it_gives_whole(
    case: tuple[bytes, dict[bytes, bytes], list[Fragment]],
    cap: int | None,
    cuts: list[int],
    inline: int,
    may_open: int | None,
    closes: list[int],
    stored_up_to: int,
) -> None:
    """The pipeline yields between slices of a partition's batch: slicing changes nothing.

    Sessions stored by an earlier batch, replays below its watermark, tombstones and the
    count of sessions that may still open all carry from one slice to the next.
    """
    delimiter, _, traffic_fragments = case
    values = [(f.key, f.value) for f in traffic_fragments]
    for close in closes:
        values.insert(close % (len(values) + 1), (SESSION_IDS[close % 3], None))
    fragments = [frag(offset, key, value) for offset, (key, value) in enumerate(values)]
    buffers = Buffers()
    earlier = fragments[: stored_up_to % (len(fragments) + 1)]
    buffers.store(
        apply_fragments(
            earlier, buffers.get, delimiter, 0, cap, None, -1, buffers.load_chunks, inline
        )
    )
    watermark = earlier[-1].offset if earlier else -1
    batch = fragments[max(len(earlier) - 2, 0) :]  # two replays, if there are any

    def partition_batch() -> PartitionBatch:
        return PartitionBatch(
            buffers.get,
            delimiter,
            max_buffer_bytes=cap,
            may_open=may_open,
            applied_through=watermark,
            load_chunks=buffers.load_chunks,
            inline_limit=inline,
        )

    whole = partition_batch()
    whole.apply(batch, 5_000)
    sliced, start = partition_batch(), 0
    for piece in split(batch, cuts):
        sliced.apply(piece, 5_000 + start)
        start += len(piece)
    assert sliced.result == whole.result


# --- last activity: the stamp idle expiry and eviction order by --------------------------


def test_each_fragment_of_a_batch_is_stamped_with_its_position() -> None:
    result = apply_fragments(
        [frag(0, b"a", b"x"), frag(1, b"b", b"y"), frag(2, b"a", b"z")],
        Buffers().get,
        NL,
        now_us=5_000_000,
    )
    stamps = {key: state.last_seen_us for key, state in result.writes.items() if state}
    assert stamps == {b"a": 5_000_002, b"b": 5_000_001}


def test_stamps_follow_the_wall_clock_after_a_billion_fragments() -> None:
    # A day of traffic at 12,000 fragments/s in batches of 20,000: 10^9 fragments stamped.
    clock = ActivityClock()
    batch, rate = 20_000, 12_000
    now_us = 1_700_000_000_000_000
    stamped = 0
    while stamped < 10**9:
        now_us += batch * 1_000_000 // rate
        first = clock.stamp(now_us, batch)
        stamped += batch
    # A session idle from its last fragment expires SESSIONS_IDLE_TIMEOUT after the wall
    # clock of its batch, not a second per million fragments the worker ever saw later.
    assert now_us <= first < now_us + 1_000
    assert clock.next_us - now_us == batch


def test_stamps_never_go_backwards_and_lead_the_clock_by_one_batch_at_most() -> None:
    clock = ActivityClock()
    # Batches faster than one fragment per microsecond: each starts after the last stamp.
    assert clock.stamp(1_000, 500) == 1_000
    assert clock.stamp(1_100, 500) == 1_500
    assert clock.stamp(1_200, 10) == 2_000
    # The wall clock passes the last stamp again: stamps are the wall clock again.
    assert clock.stamp(9_000, 10) == 9_000


def test_after_a_restart_new_sessions_sort_after_the_ones_stored_before_it() -> None:
    # Eviction takes the oldest stamp first: a session last seen before a restart must be
    # older than every session opened after it, whatever the old worker had processed.
    before = ActivityClock()
    now_us = 1_700_000_000_000_000
    for _ in range(50_000):  # 10^9 fragments at 50,000/s
        now_us += 400_000
        old = before.stamp(now_us, 20_000) + 19_999
    after = ActivityClock()  # a new worker process
    assert after.stamp(now_us + 1_000_000, 1) > old
