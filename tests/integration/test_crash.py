"""kill -9 mid-stream, a batch that fails, and restarts: every record out, none corrupted."""

from __future__ import annotations

from pathlib import Path

import rocksdict

from sessions_app.core.keys import marker_key
from sessions_app.tools.loadgen import generate, interleave

from .conftest import Deployment, in_phases, records_completed


def test_kill_9_mid_stream_loses_and_corrupts_nothing(deployment: Deployment) -> None:
    """Killed twice while sessions are open, and a phase of input is still unread.

    The input goes in three phases; each kill comes before the next phase is sent, so
    every session has records still to come at both kills (mid-stream by construction,
    not by timing). The first kill lands while the worker works through the first phase.
    """
    sessions = generate("k", 300, 25, b"\r\n", seed=5)
    phases = in_phases(sessions, 3, seed=5)

    worker = deployment.start_worker()
    deployment.produce(phases[0])
    worker.wait_for("records_emitted", records_completed(phases[0], b"\r\n") // 3)
    worker.kill9()
    # Sent while the worker is down: read after the restart, from the committed offsets on.
    deployment.produce(phases[1])
    worker.start()
    worker.wait_for("records_emitted", 200)
    worker.kill9()
    worker.start()
    deployment.produce(phases[2])

    check = deployment.verify(sessions)
    assert check.ok, check.summary() + "\n" + worker.log()[-4000:]
    # Repeats (at-least-once) carry their session's key: nothing else reached the output.
    assert check.foreign == 0, check.summary()


def poison(data_dir: Path, present: bool) -> None:
    """Put in (or take out of) every partition's store a flush marker no version can read."""
    options = rocksdict.Options(raw_mode=True)
    for path in sorted(data_dir.glob("v1/tables/session_buffers-*.db")):
        db = rocksdict.Rdict(str(path), options)
        try:
            if present:
                db[marker_key(b"poison")] = b"\x09unreadable"
            else:
                del db[marker_key(b"poison")]
        finally:
            db.close()


def test_a_batch_that_fails_stops_the_worker_and_nothing_is_applied_past_it(
    deployment: Deployment,
) -> None:
    """A failure mid-batch (here an unreadable flush marker) must not let the next batch in.

    Faust restarts a crashed agent on the next fetch; had the worker gone on, sessions would
    have lost the failed batch's fragments and its offsets would never commit. It stops
    instead, and once the cause is gone a restart applies everything, in order.
    """
    sessions = generate("fail", 60, 6, b"\r\n", seed=11)
    first, second = sessions[:30], sessions[30:]
    worker = deployment.start_worker()
    deployment.produce([(key, frag, None) for key, frag in interleave(first, seed=11)])
    assert deployment.verify(first).ok
    worker.stop()

    poison(worker.data_dir, present=True)
    worker.start()
    deployment.produce([(key, frag, None) for key, frag in interleave(second, seed=11)])
    assert worker.process is not None
    assert worker.process.wait(timeout=60) != 0
    log = worker.current_log()
    assert "A batch failed; stopping the worker" in log or "An idle sweep failed" in log
    later = {s.key for s in second}
    assert not [r for r in deployment.read("output", 0, timeout=2) if r.key in later]

    poison(worker.data_dir, present=False)
    worker.start()
    check = deployment.verify(sessions)
    assert check.ok, check.summary()
