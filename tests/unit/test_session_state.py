"""The stored form of a session buffer."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sessions_app.core.session_state import HEADER_SIZE, CorruptSessionState, SessionState


@given(
    st.integers(min_value=-1, max_value=2**63 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.integers(min_value=0, max_value=2**63 - 1),
    st.binary(max_size=200),
)
def test_round_trip(offset: int, seq: int, seen: int, pending: bytes) -> None:
    state = SessionState(offset, seq, seen, pending)
    raw = state.encode()
    assert len(raw) == HEADER_SIZE + len(pending)
    assert SessionState.decode(raw) == state


def test_short_value_is_corrupt() -> None:
    with pytest.raises(CorruptSessionState, match="shorter"):
        SessionState.decode(b"garbage")


def test_unknown_version_is_corrupt() -> None:
    raw = bytearray(SessionState(pending=b"x").encode())
    raw[0] = 9
    with pytest.raises(CorruptSessionState, match="version 9"):
        SessionState.decode(bytes(raw))


def test_the_stored_form_is_fixed() -> None:
    """Buffers written by earlier versions, and the changelog, must stay readable."""
    inline = bytes.fromhex("01000000000000000500000000000000070000000000000009") + b"ab"
    assert SessionState(5, 7, 9, b"ab").encode() == inline
    assert SessionState.decode(inline) == SessionState(5, 7, 9, b"ab")
    chunked = (
        bytes.fromhex("02fffffffffffffffe00000000000000030000000000000004")
        + bytes.fromhex("000000020000000000000064")
        + b"\r"
    )
    assert SessionState(-2, 3, 4, b"\r", 2, 100).encode() == chunked
    assert SessionState.decode(chunked) == SessionState(-2, 3, 4, b"\r", 2, 100)
