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
