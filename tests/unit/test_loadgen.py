"""The load generator's sessions and the verifier's verdicts."""

from __future__ import annotations

import random

from sessions_app.core.reassembly import cut_records, frame
from sessions_app.tools.loadgen import Verification, cut_fragments, generate, interleave


def test_fragments_rebuild_every_record() -> None:
    for delimiter in (b"\n", b"\r\n", b"<END>"):
        (session,) = generate("r", 1, 50, delimiter, seed=7)
        assert b"".join(session.fragments) == frame(session.records, delimiter)
        pending, out = b"", []
        for fragment in session.fragments:
            records, pending = cut_records(pending, fragment, delimiter)
            out += records
        assert out == session.records


def test_some_fragments_split_a_multi_byte_delimiter() -> None:
    stream = frame([b"x" * 50] * 40, b"\r\n")
    fragments = cut_fragments(stream, b"\r\n", random.Random(1), max_fragments=3)
    assert any(f.endswith(b"\r") for f in fragments)


def test_interleave_keeps_each_session_in_order() -> None:
    sessions = generate("r", 20, 5, b"\n", seed=3)
    sent: dict[bytes, list[bytes]] = {}
    keys = []
    for key, fragment in interleave(sessions, seed=3):
        sent.setdefault(key, []).append(fragment)
        keys.append(key)
    assert all(sent[s.key] == s.fragments for s in sessions)
    assert keys[:20] != sorted(keys[:20])


def test_verification_verdicts() -> None:
    expected = {b"k": [b"a", b"b", b"c"]}
    good = Verification(expected)
    for seq, value in [(0, b"a"), (1, b"b"), (1, b"b"), (2, b"c")]:
        good.add(b"k", value, str(seq).encode(), 0)
    assert good.ok and good.duplicates == 1

    lossy = Verification(expected)
    lossy.add(b"k", b"a", b"0", 0)
    assert not lossy.ok and "missing:           2" in lossy.summary()

    corrupt = Verification(expected)
    for seq, value in [(0, b"a"), (1, b"X"), (2, b"c")]:
        corrupt.add(b"k", value, str(seq).encode(), 0)
    assert not corrupt.ok and len(corrupt.corrupt) == 1

    skipped = Verification(expected)
    for seq, value in [(0, b"a"), (2, b"c"), (1, b"b")]:
        skipped.add(b"k", value, str(seq).encode(), 0)
    assert not skipped.ok and skipped.out_of_order
