"""Cutting fragments into records: any records, any delimiter, any cutting."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessions_app.core.reassembly import cut_records, frame, is_unambiguous

delimiters = st.binary(min_size=1, max_size=4)


@st.composite
def records_and_delimiter(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    delimiter = draw(delimiters)
    records = draw(
        st.lists(st.binary(max_size=40).filter(lambda r: is_unambiguous(r, delimiter)), max_size=12)
    )
    return records, delimiter


def feed(stream: bytes, cuts: list[int], delimiter: bytes) -> tuple[list[bytes], bytes]:
    """Feed `stream` cut at `cuts`, fragment by fragment; return all records and the tail."""
    bounds = [0, *sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]
    pending = b""
    out: list[bytes] = []
    for start, end in itertools.pairwise(bounds):
        records, pending = cut_records(pending, stream[start:end], delimiter)
        out += records
    return out, pending


@given(records_and_delimiter(), st.binary(max_size=30), st.lists(st.integers(min_value=0)))
def test_any_cutting_gives_back_the_records_and_the_tail(
    case: tuple[list[bytes], bytes], tail: bytes, cuts: list[int]
) -> None:
    records, delimiter = case
    # The unfinished tail is whatever follows the last delimiter: it holds none.
    tail = tail.split(delimiter)[0]
    emitted, pending = feed(frame(records, delimiter) + tail, cuts, delimiter)
    assert emitted == records
    assert pending == tail


@given(records_and_delimiter())
def test_one_byte_at_a_time(case: tuple[list[bytes], bytes]) -> None:
    records, delimiter = case
    stream = frame(records, delimiter)
    emitted, pending = feed(stream, list(range(len(stream))), delimiter)
    assert emitted == records
    assert pending == b""


def test_delimiter_split_across_fragments() -> None:
    records, pending = cut_records(b"abc\r", b"\ndef", b"\r\n")
    assert (records, pending) == ([b"abc"], b"def")


def test_two_delimiters_in_a_row_give_an_empty_record() -> None:
    assert cut_records(b"", b"a\n\nb", b"\n") == ([b"a", b""], b"b")


def test_binary_payload_with_nul_delimiter() -> None:
    assert cut_records(b"\xff\n", b"\x01\x00\x00", b"\x00") == ([b"\xff\n\x01", b""], b"")


def test_empty_fragment_changes_nothing() -> None:
    assert cut_records(b"tail", b"", b"\n") == ([], b"tail")


def test_empty_delimiter_is_refused() -> None:
    with pytest.raises(ValueError, match="delimiter"):
        cut_records(b"", b"x", b"")


def test_overlapping_delimiter_framing_is_detected() -> None:
    assert not is_unambiguous(b"a", b"aa")
    assert not is_unambiguous(b"xay", b"a")
    assert is_unambiguous(b"b", b"aa")
