"""The census's buckets and extremes, fed sessions one at a time: no store, no broker."""

from __future__ import annotations

from sessions_app.core.census import TOP, Census, idle_bounds, pending_bounds, shown

NOW = 1_000_000_000


def census() -> Census:
    return Census(pending_bounds(1024 * 1024), idle_bounds(300.0), NOW)


def test_bounds_grow_by_sixteen_up_to_the_cap_and_the_timeout() -> None:
    assert pending_bounds(1024 * 1024) == [0, 64, 1024, 16384, 262144, 1048576]
    assert pending_bounds(100) == [0, 64, 100]
    assert idle_bounds(300.0) == [1.0, 10.0, 60.0, 300.0]
    assert idle_bounds(5.0) == [1.0, 5.0]


def test_sessions_fall_in_their_buckets_edges_included() -> None:
    c = census()
    for pending in (0, 1, 64, 65, 1024, 1025, 1048576, 2_000_000):
        c.add(b"p%d" % pending, pending, NOW)
    for idle in (0.5, 1.0, 9.9, 10.0, 299.0, 300.0, 5000.0):
        c.add(b"i%g" % idle, 0, NOW - int(idle * 1e6))
    report = c.as_dict()
    assert [(b["bucket"], b["sessions"]) for b in report["by_pending_bytes"]] == [
        ("0", 1 + 7),
        ("1-64", 2),
        ("65-1024", 2),
        ("1025-16384", 1),
        ("16385-262144", 0),
        ("262145-1048576", 1),
        ("beyond", 1),
    ]
    assert [(b["bucket"], b["sessions"]) for b in report["by_idle_seconds"]] == [
        ("<1s", 8 + 1),
        ("1-10s", 2),
        ("10-60s", 1),
        ("60-300s", 1),
        ("beyond", 2),
    ]
    assert report["sessions"] == 15
    assert report["pending_bytes_total"] == sum((0, 1, 64, 65, 1024, 1025, 1048576, 2_000_000))


def test_only_the_top_largest_and_idlest_are_kept_in_order() -> None:
    c = census()
    for n in range(1000):
        c.add(b"s%04d" % n, n, NOW - n * 1_000_000)
    report = c.as_dict()
    largest = report["largest"]
    idlest = report["longest_idle"]
    assert isinstance(largest, list) and isinstance(idlest, list)
    assert [row["pending_bytes"] for row in largest] == list(range(999, 999 - TOP, -1))
    assert [row["idle_seconds"] for row in idlest] == [float(n) for n in range(999, 999 - TOP, -1)]
    assert len(c._largest) == len(c._idlest) == TOP  # nothing kept per session beyond these


def test_session_ids_are_shown_short_and_printable() -> None:
    assert shown(b"web-0001") == "web-0001"
    assert shown(b"\xff\x00" + b"x" * 40) == "\\xff\x00" + "x" * 22 + "…"
