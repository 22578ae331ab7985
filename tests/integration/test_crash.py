"""kill -9 mid-stream and restart: every record out, none corrupted."""

from __future__ import annotations

from sessions_app.tools.loadgen import generate

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
