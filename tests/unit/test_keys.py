"""Key layout of a table partition: the idle index sorts by last activity."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sessions_app.core import keys

times = st.integers(min_value=0, max_value=2**62)
sessions = st.binary(max_size=30)


@given(times, sessions, times, sessions)
def test_idle_keys_sort_by_time_then_session(t1: int, s1: bytes, t2: int, s2: bytes) -> None:
    k1, k2 = keys.idle_key(t1, s1), keys.idle_key(t2, s2)
    assert (k1 < k2) == ((t1, s1) < (t2, s2))
    assert keys.parse_idle_key(k1) == (t1, s1)


@given(times, sessions, times)
def test_idle_bound_separates_older_from_newer(t: int, session: bytes, cutoff: int) -> None:
    assert (keys.idle_key(t, session) < keys.idle_bound(cutoff)) == (t < cutoff)
    assert keys.IDLE <= keys.idle_key(t, session) < keys.IDLE_END


@given(sessions)
def test_kinds_never_collide(session: bytes) -> None:
    kinds = {keys.buffer_key(session)[:1], keys.marker_key(session)[:1], keys.IDLE, keys.COUNT_KEY}
    assert len(kinds) == 4
    assert not keys.COUNT_KEY.startswith(keys.IDLE)


@given(
    st.integers(min_value=0, max_value=2**62),
    st.integers(min_value=0, max_value=2**63),
    st.binary(),
)
def test_flush_marker_round_trip(scan_from: int, seq: int, pending: bytes) -> None:
    marker = keys.FlushMarker(scan_from, seq, pending)
    assert keys.FlushMarker.decode(marker.encode()) == marker


def test_count_round_trip() -> None:
    assert keys.decode_count(None) == 0
    assert keys.decode_count(keys.encode_count(12345)) == 12345
