"""One partition's RocksDB store, against rocksdict alone: no broker, no Faust worker."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import rocksdict
from hypothesis import example, given
from hypothesis import strategies as st

from sessions_app.core import keys
from sessions_app.core.batch import ActivityClock, Fragment, apply_fragments
from sessions_app.core.capacity import choose_evictions
from sessions_app.core.session_state import SessionState
from sessions_app.engine.store import PartitionStore, idle_key_of, last_seen_of, prepare_write

OFFSET_KEY = b"__faust\0offset__"


def open_db(path: Path) -> Any:
    options = rocksdict.Options(raw_mode=True)
    options.create_if_missing(True)
    return rocksdict.Rdict(str(path), options)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Any]:
    opened = open_db(tmp_path / "p0")
    yield opened
    opened.close()


def write(
    store: PartitionStore,
    writes: dict[bytes, SessionState | None],
    changelog_offset: int,
    markers: dict[bytes, bytes | None] | None = None,
    watermark: int | None = None,
) -> None:
    """Write as the pipeline does: the states found before, the new ones encoded."""
    before = {sid: store.session(sid) for sid in writes}
    encoded = {sid: None if s is None else s.encode() for sid, s in writes.items()}
    store.commit(prepare_write(writes, before, encoded, markers, watermark), changelog_offset)


def state(last_seen_us: int, pending: bytes = b"tail", offset: int = 0) -> SessionState:
    return SessionState(offset, 1, last_seen_us, pending)


def test_a_write_keeps_buffers_idle_index_and_count_in_step(db: Any) -> None:
    store = PartitionStore(db, OFFSET_KEY)
    write(store, {b"a": state(300), b"b": state(100), b"c": state(200)}, changelog_offset=7)
    assert store.live_count() == 3
    assert store.oldest(10) == [(100, b"b"), (200, b"c"), (300, b"a")]
    # b is touched again: its old index entry goes, the new one sorts last.
    write(store, {b"b": state(400, b"more"), b"c": None}, changelog_offset=8)
    assert store.oldest(10) == [(300, b"a"), (400, b"b")]
    assert store.session(b"b") == state(400, b"more")
    assert store.session(b"c") is None and not store.has_session(b"c")
    assert store.states([b"c", b"b", b"a"]) == [None, state(400, b"more"), state(300)]
    assert store.live_count() == 2
    assert db[OFFSET_KEY] == b"8"  # where Faust's recovery resumes the changelog


def test_oldest_stops_at_the_deadline_and_skips_sessions_in_hand(db: Any) -> None:
    store = PartitionStore(db, OFFSET_KEY)
    write(store, {b"a": state(100), b"b": state(200), b"c": state(300)}, changelog_offset=0)
    assert store.oldest(10, before_us=300) == [(100, b"a"), (200, b"b")]
    assert store.oldest(10, before_us=301) == [(100, b"a"), (200, b"b"), (300, b"c")]
    assert store.oldest(1) == [(100, b"a")]
    assert store.oldest(2, skip={b"a"}) == [(200, b"b"), (300, b"c")]
    assert store.oldest(0) == []
    # The walk behind `oldest`, read lazily: eviction merges the partitions' walks.
    walk = store.idle(skip={b"b"})
    assert next(walk) == (100, b"a")
    assert list(walk) == [(300, b"c")]


def test_walks_start_past_the_evicted_yet_find_a_session_put_before_them(db: Any) -> None:
    """The walk starts where the last one found its first key, past evictions' tombstones.

    A write of an older stamp (a standby's changelog, another worker's clock) lowers
    that start again: such a session must still be the first to go.
    """
    store = PartitionStore(db, OFFSET_KEY)
    write(store, {sid: state(seen) for sid, seen in [(b"a", 100), (b"b", 200), (b"c", 300)]}, 0)
    assert store.oldest(1) == [(100, b"a")]
    write(store, {b"a": None}, 1)  # evicted
    assert store.oldest(1) == [(200, b"b")]
    # The next walk starts at b, past a's tombstone (what spares the walks at the cap).
    assert store._idle_floor == keys.idle_key(200, b"b")
    write(store, {b"b": None}, 2)
    assert store.oldest(5) == [(300, b"c")]
    write(store, {b"old": state(50)}, 3)
    assert store.oldest(5) == [(50, b"old"), (300, b"c")]
    store.apply_changelog([Record(keys.buffer_key(b"older"), state(20).encode(), 4)])
    assert store.oldest(5) == [(20, b"older"), (50, b"old"), (300, b"c")]
    assert store.oldest(5, before_us=40) == [(20, b"older")]
    write(store, {b"older": None, b"old": None, b"c": None}, 5)
    assert store.oldest(5) == []
    write(store, {b"new": state(10)}, 6)
    assert store.oldest(5) == [(10, b"new")]


def test_the_count_watermark_and_markers_survive_a_reopen(tmp_path: Path) -> None:
    db = open_db(tmp_path / "p1")
    store = PartitionStore(db, OFFSET_KEY)
    marker = keys.FlushMarker(scan_from=12, seq=3, pending=b"\x00left")
    write(
        store,
        {b"a": state(1), b"b": state(2)},
        changelog_offset=4,
        markers={b"gone": marker.encode()},
        watermark=41,
    )
    db.close()

    reopened = PartitionStore(open_db(tmp_path / "p1"), OFFSET_KEY)
    assert reopened.live_count() == 2
    assert reopened.watermark() == 41
    assert reopened.markers() == {b"gone": marker}
    write(reopened, {}, changelog_offset=5, markers={b"gone": None})
    assert reopened.markers() == {}
    reopened.db.close()


class Record(NamedTuple):
    key: bytes | None
    value: bytes | None
    offset: int


def test_changelog_records_rebuild_the_index_and_count(tmp_path: Path) -> None:
    # What the pipeline wrote in one worker, applied from the changelog in another.
    source = PartitionStore(open_db(tmp_path / "source"), OFFSET_KEY)
    changelog: list[Record] = []
    batches: list[dict[bytes, SessionState | None]] = [
        {b"a": state(10), b"b": state(20)},
        {b"a": state(30, b"a2"), b"c": state(25)},
        {b"b": None},
    ]
    for offset, writes in enumerate(batches):
        write(source, writes, changelog_offset=offset)
        changelog += [
            Record(keys.buffer_key(sid), None if s is None else s.encode(), offset)
            for sid, s in writes.items()
        ]
    changelog.append(Record(keys.WATERMARK_KEY, keys.encode_offset(99), len(batches)))

    rebuilt = PartitionStore(open_db(tmp_path / "rebuilt"), OFFSET_KEY)
    rebuilt.apply_changelog(changelog[:3])  # a batch boundary inside one write
    rebuilt.apply_changelog(changelog[3:])
    assert rebuilt.oldest(10) == source.oldest(10) == [(25, b"c"), (30, b"a")]
    assert rebuilt.live_count() == source.live_count() == 2
    assert rebuilt.session(b"a") == state(30, b"a2")
    assert rebuilt.watermark() == 99
    assert rebuilt.db[OFFSET_KEY] == str(len(batches)).encode()
    for store in (source, rebuilt):
        store.db.close()


def test_writes_from_a_thread_and_changelog_records_on_the_loop_keep_the_count(
    tmp_path: Path,
) -> None:
    # The pipeline writes from a thread of its own while RocksDB lets go of the GIL; a
    # standby's changelog records may be applied to the same instance meanwhile.
    store = PartitionStore(open_db(tmp_path / "p2"), OFFSET_KEY)
    prepared = []
    for n in range(30):
        writes: dict[bytes, SessionState | None] = {
            b"w%d-%d" % (n, i): state(n * 10_000 + i) for i in range(2_000)
        }
        encoded = {sid: s.encode() for sid, s in writes.items() if s is not None}
        prepared.append(prepare_write(writes, {}, encoded))
    done = threading.Event()

    def pipeline_writes() -> None:
        try:
            for offset, batch in enumerate(prepared):
                store.commit(batch, offset)
        finally:
            done.set()

    writer = threading.Thread(target=pipeline_writes)
    writer.start()
    applied = 0
    while not done.is_set():
        sid = b"c%d" % applied
        store.apply_changelog([Record(keys.buffer_key(sid), state(applied).encode(), applied)])
        applied += 1
    writer.join()
    assert applied > 0  # changelog records came in while the thread wrote
    stored = sum(1 for _ in store.sessions())
    assert stored == 30 * 2_000 + applied
    assert store.live_count() == stored
    store.db.close()
    reopened = PartitionStore(open_db(tmp_path / "p2"), OFFSET_KEY)
    assert reopened.live_count() == stored
    reopened.db.close()


def test_a_change_recovered_from_the_changelog_before_its_write_is_not_written_again(
    db: Any,
) -> None:
    # A partition stays on this worker through a rebalance: recovery applies the change's
    # changelog records (offsets 5-6) before the pipeline's write of the same change.
    store = PartitionStore(db, OFFSET_KEY)
    write(store, {b"a": state(10)}, changelog_offset=4)
    writes: dict[bytes, SessionState | None] = {b"b": state(20), b"c": state(30)}
    before = {sid: store.session(sid) for sid in writes}
    encoded = {sid: s.encode() for sid, s in writes.items() if s is not None}
    store.apply_changelog(
        [
            Record(keys.buffer_key(sid), value, 5 + i)
            for i, (sid, value) in enumerate(encoded.items())
        ]
    )
    assert store.live_count() == 3
    prepared = prepare_write(writes, before, encoded)
    assert not store.commit(prepared, changelog_offset=6, first_offset=5)
    assert store.live_count() == 3
    assert store.oldest(10) == [(10, b"a"), (20, b"b"), (30, b"c")]
    # The next change, past what recovery applied, is written.
    later = {b"d": state(40)}
    prepared = prepare_write(later, {b"d": None}, {b"d": state(40).encode()})
    assert store.commit(prepared, changelog_offset=7, first_offset=7)
    assert store.live_count() == 4
    assert store.changelog_offset() == 7


def test_the_loader_reads_what_the_batch_core_decodes(db: Any) -> None:
    store = PartitionStore(db, OFFSET_KEY)
    result = apply_fragments([Fragment("in", 0, 5, b"s", b"abc")], store.loader(), b"\n", 1_000)
    write(store, dict(result.writes), changelog_offset=0)
    again = apply_fragments([Fragment("in", 0, 6, b"s", b"d\n")], store.loader(), b"\n", 2_000)
    assert [r.value for r in again.records] == [b"abcd"]
    assert store.loader()(b"missing") is None


def test_eviction_after_a_restart_takes_the_longest_idle_session(db: Any) -> None:
    store = PartitionStore(db, OFFSET_KEY)
    wall_us = 1_700_000_000_000_000
    # The old worker ran for a day: 10^9 fragments at 12,000/s, in batches of 20,000.
    old_clock = ActivityClock()
    for _ in range(50_000):
        wall_us += 20_000 * 1_000_000 // 12_000
        first = old_clock.stamp(wall_us, 20_000)
    old = apply_fragments(
        [Fragment("in", 0, 1, b"old", b"x")], store.loader(), b"\n", first, max_buffer_bytes=None
    )
    write(store, dict(old.writes), changelog_offset=0)

    # A restart: a new clock, the wall clock a minute on.
    new_clock = ActivityClock()
    wall_us += 60_000_000
    new = apply_fragments(
        [Fragment("in", 0, 2, b"new", b"y")], store.loader(), b"\n", new_clock.stamp(wall_us, 1)
    )
    write(store, dict(new.writes), changelog_offset=1)

    stored = [(seen, 0, sid) for seen, sid in store.oldest(1)]
    assert choose_evictions(stored, [], 1) == [(first, 0, b"old")]


def test_the_walk_yields_every_session_in_order_past_unreadable_ones(db: Any) -> None:
    store = PartitionStore(db, OFFSET_KEY)
    ids = [b"a", b"a\x00", b"ab", b"b", b"c"]
    write(store, {sid: state(i, b"x" * i) for i, sid in enumerate(ids)}, changelog_offset=0)
    db[keys.buffer_key(b"ab")] = b"short"  # unreadable: skipped, not the end of the walk
    walk = store.sessions()
    first = next(walk)
    # Writes while a walk is held (the stream goes on between its steps) do not disturb it.
    write(store, {b"a": None, b"zz": state(9)}, changelog_offset=1)
    rest = list(walk)
    assert [(sid, pending) for sid, pending, _ in [first, *rest]] == [
        (b"a", 0),
        (b"a\x00", 1),
        (b"b", 3),
        (b"c", 4),
    ]


def test_chunks_are_written_and_rebuilt_from_the_changelog_without_counting_as_sessions(
    tmp_path: Path,
) -> None:
    source = PartitionStore(open_db(tmp_path / "source"), OFFSET_KEY)
    chunked = SessionState(3, 0, 77, b"\r", chunks=2, spilled=6)
    write_chunks = {(b"big", 0): b"abc", (b"big", 1): b"def"}
    encoded = {b"big": chunked.encode()}
    source.commit(prepare_write({b"big": chunked}, {b"big": None}, encoded, chunks=write_chunks), 0)
    assert source.live_count() == 1
    assert source.pending(b"big", chunked) == b"abcdef\r"
    assert source.oldest(5) == [(77, b"big")]

    changelog = [
        Record(keys.chunk_key(b"big", 0), b"abc", 0),
        Record(keys.chunk_key(b"big", 1), b"def", 1),
        Record(keys.buffer_key(b"big"), chunked.encode(), 2),
    ]
    rebuilt = PartitionStore(open_db(tmp_path / "rebuilt"), OFFSET_KEY)
    rebuilt.apply_changelog(changelog)
    assert rebuilt.live_count() == 1  # chunks are not sessions
    state = rebuilt.session(b"big")
    assert state == chunked
    assert rebuilt.pending(b"big", state) == b"abcdef\r"
    census = list(rebuilt.sessions())
    assert census == [(b"big", 7, 77)]  # the census counts the chunks' bytes too
    # The record completes: the chunks go with tombstones, in the same write as the buffer.
    done = SessionState(4, 1, 78, b"")
    rebuilt.apply_changelog(
        [
            Record(keys.buffer_key(b"big"), done.encode(), 3),
            Record(keys.chunk_key(b"big", 0), None, 4),
            Record(keys.chunk_key(b"big", 1), None, 5),
        ]
    )
    assert rebuilt.db.get(keys.chunk_key(b"big", 0)) is None
    assert rebuilt.live_count() == 1
    for store in (source, rebuilt):
        store.db.close()


@given(
    last_seen=st.integers(-(2**63), 2**63 - 1),
    chunks=st.integers(0, 3),
    pending=st.binary(max_size=40),
    session_id=st.binary(min_size=1, max_size=20),
)
@example(last_seen=-1, chunks=0, pending=b"", session_id=b"s")
@example(last_seen=0, chunks=2, pending=b"\r", session_id=b"s")
def test_a_rebuild_indexes_a_stored_state_as_the_pipeline_does(
    last_seen: int, chunks: int, pending: bytes, session_id: bytes
) -> None:
    new = SessionState(7, 3, last_seen, pending, chunks, 100 * chunks)
    stored = new.encode()
    # The pipeline's write batch indexes the state under the key recovery derives.
    prepared = prepare_write({session_id: new}, {session_id: None}, {session_id: stored})
    assert prepared.lowest_idle == idle_key_of(stored, session_id)
    assert idle_key_of(stored, session_id) == keys.idle_key(last_seen, session_id)
    assert last_seen_of(stored) == last_seen


@pytest.mark.parametrize("stamps", [(-1, 5), (-(2**63), -2), (0, -7), (3, 2**63 - 1)])
def test_a_write_replaces_the_index_entry_of_any_stamp(db: Any, stamps: tuple[int, int]) -> None:
    """Stamps below zero sort as zero; the entry the first write put, the second deletes."""
    store = PartitionStore(db, OFFSET_KEY)
    first, second = stamps

    def index() -> list[bytes]:
        return [key for key in db.keys(from_key=keys.IDLE) if key[:1] == keys.IDLE]

    write(store, {b"s": state(first)}, changelog_offset=1)
    assert index() == [keys.idle_key(first, b"s")]
    write(store, {b"s": state(second)}, changelog_offset=2)
    assert index() == [keys.idle_key(second, b"s")]
    assert store.oldest(5) == [(max(second, 0), b"s")]


def test_a_rebuild_indexes_no_unreadable_state() -> None:
    readable = SessionState(7, 3, 10, b"abc").encode()
    for raw in (
        None,
        b"",
        readable[:10],
        b"\x09" + readable[1:],
        b"\x02" + readable[1:20],
        b"\x02" + readable[1:],
    ):
        assert idle_key_of(raw, b"s") is None
        assert last_seen_of(raw) is None
