"""Applying a partition's batch of fragments to stored buffers, without a broker."""

from __future__ import annotations

from sessions_app.batch import Fragment, apply_fragments
from sessions_app.session_state import SessionState

NL = b"\n"


class Buffers(dict[bytes, bytes]):
    """Stored buffers as the agent keeps them: session ID -> encoded SessionState."""

    def apply(self, fragments: list[Fragment], delimiter: bytes = NL):  # type: ignore[no-untyped-def]
        result = apply_fragments(fragments, self.get, delimiter, now_us=1_000)
        for key, state in result.writes.items():
            if state is None:
                self.pop(key, None)
            else:
                self[key] = state.encode()
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
    assert [(r.value, dict(r.headers)) for r in result.expired] == [
        (b"a" * 60 + b"b" * 60, {"reason": b"overflow", "seq": b"0"})
    ]
    assert [(r.value, dict(r.headers)["seq"]) for r in result.records] == [(b"c" * 30, b"0")]
    assert result.overflows == 1


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
