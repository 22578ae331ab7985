"""Liveness and readiness probes of real workers, as an orchestrator sees them."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from sessions_app.tools.embedded_broker import create_topics_sync

from .conftest import Deployment, Worker


def probe(worker: Worker, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{worker.web_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return err.code, json.loads(err.read())


def test_a_worker_with_partitions_is_live_and_ready_one_without_is_live_only(
    deployment: Deployment,
) -> None:
    # One input partition for two workers: the second has nothing to do.
    for name in ("INPUT", "OUTPUT", "EXPIRED", "DLQ", "ALERTS"):
        topic = deployment.env[f"SESSIONS_{name}_TOPIC"] + "-one"
        create_topics_sync(deployment.broker.bootstrap, [topic], 1)
        deployment.env[f"SESSIONS_{name}_TOPIC"] = topic
    deployment.env["SESSIONS_PARTITIONS"] = "1"
    deployment.env["SESSIONS_WEB_TOKEN"] = "a-token-the-probes-never-need"
    first = deployment.start_worker("w1")
    second = deployment.start_worker("w2")
    workers: list[Worker] = []

    def one_ready_one_not(_: object) -> bool:
        codes = {probe(w, "/readyz")[0]: w for w in (first, second)}
        workers[:] = [codes[200], codes[503]] if sorted(codes) == [200, 503] else []
        return bool(workers)

    first.wait_until(one_ready_one_not, "one worker ready, the other not")
    busy, idle = workers
    assert probe(busy, "/readyz") == (200, {"status": "ready"})
    assert probe(idle, "/readyz") == (
        503,
        {"status": "not ready", "reason": "no input partition is assigned to this worker"},
    )
    for worker in (busy, idle):
        assert probe(worker, "/livez") == (200, {"status": "ok"})
    # A lookup on the worker that owns nothing names the partition to ask for.
    token = deployment.env["SESSIONS_WEB_TOKEN"]
    request = urllib.request.Request(
        f"http://127.0.0.1:{idle.web_port}/sessions/lookup?key=someone",
        headers={"Authorization": f"Bearer {token}"},
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=10)
    with err.value:
        assert err.value.code == 404
        assert json.loads(err.value.read())["partition"] == 0

    # The worker that idles takes over when the busy one leaves: it becomes ready.
    busy.stop()
    idle.wait_until(lambda _: probe(idle, "/readyz")[0] == 200, "the idle worker ready")
