"""kill -9 mid-stream and restart: every record out, none corrupted."""

from __future__ import annotations

from sessions_app.loadgen import Verification, generate, interleave

from .conftest import Deployment


def test_kill_9_mid_stream_loses_and_corrupts_nothing(deployment: Deployment) -> None:
    sessions = generate("k", 300, 25, b"\r\n", seed=5)
    expected = {s.key: s.records for s in sessions}
    total = sum(len(r) for r in expected.values())
    worker = deployment.start_worker()
    deployment.produce([(key, frag, None) for key, frag in interleave(sessions, seed=5)])

    for fraction in (0.2, 0.5):
        worker.wait_for("records_emitted", int(total * fraction) // worker.starts)
        worker.kill9()
        worker.start()

    out = deployment.read("output", total, timeout=120)
    check = Verification(expected)
    for record in out:
        check.add(record.key, record.value, record.headers.get("seq"), 0)
    assert check.ok, check.summary() + "\n" + worker.log()[-4000:]
    # Repeats are allowed (at-least-once), but only of records already sent.
    assert len(out) == total + check.duplicates
