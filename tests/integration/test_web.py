"""The web views of a live worker with real traffic, and the dashboard in a real Chromium."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from sessions_app.tools import harness

from .conftest import Deployment, Worker

TOKEN = "s3cret-token-for-tests"


def get(
    worker: Worker, path: str, method: str = "GET", token: str | None = None
) -> tuple[int, str]:
    url = f"http://{worker.web_host}:{worker.web_port}{path}"
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def load(deployment: Deployment, sessions: range) -> None:
    """Each session: two fragments, one complete record, and a remnant left pending."""
    items: list[harness.Item] = []
    for i in sessions:
        key = f"web-{i:04d}".encode()
        items += [(key, b"first rec", None), (key, b"ord\r\nrest", None)]
    deployment.produce(items)


@pytest.fixture
def busy_worker(deployment: Deployment) -> Worker:
    """220 sessions against a cap of 250, the alarm at half of it, the web on 127.0.0.2.

    The sessions come in three sends so the alarm is raised at exactly 125, not at
    whatever count the batch that crossed the line ended with.
    """
    deployment.env["SESSIONS_MAX_SESSIONS"] = "250"
    deployment.env["SESSIONS_ALARM_RATIO"] = "0.5"
    deployment.env["SESSIONS_HEAP_MIN_INTERVAL"] = "2"
    deployment.env["SESSIONS_WEB_HOST"] = "127.0.0.2"
    worker = deployment.start_worker()
    load(deployment, range(124))
    stats = worker.wait_until(lambda s: s["live_sessions"] == 124, "124 live")
    assert stats["alarm"]["state"] == "ok", "raised below half the cap"
    load(deployment, range(124, 125))
    worker.wait_until(lambda s: s["alarm"]["state"] == "raised", "alarm raised at 125")
    load(deployment, range(125, 220))
    worker.wait_until(lambda s: s["totals"]["fragments_consumed"] == 440, "440 fragments")
    return worker


def test_sessions_alarms_and_metrics_match_the_traffic_on_the_web_host(
    busy_worker: Worker,
) -> None:
    stats = busy_worker.stats()
    assert stats["live_sessions"] == 220
    assert sum(stats["live_sessions_by_partition"].values()) == 220
    assert len(stats["live_sessions_by_partition"]) == 4
    assert (stats["max_sessions"], stats["usage"]) == (250, 220 / 250)
    assert stats["totals"]["records_emitted"] == 220
    assert stats["totals"]["sessions_opened"] == 220
    assert stats["alarm"]["state"] == "raised" and stats["alarm"]["since"] > 0
    assert stats["process_rss_bytes"] > 10 * 1024 * 1024
    assert stats["rocksdb"]["budget_bytes"] == 128 * 1024 * 1024
    assert 0 < stats["rocksdb"]["memtable_bytes"] <= stats["rocksdb"]["block_cache_usage_bytes"]

    status, body = get(busy_worker, "/alarms/")
    assert status == 200
    alarms = json.loads(body)
    assert [(a["alarm"], a["count"], a["cap"]) for a in alarms["active"]] == [
        ("session-capacity", 220, 250)
    ]
    assert [
        (t["alarm"], t["state"], t["count"], t["cap"], t["ratio"]) for t in alarms["transitions"]
    ] == [("session-capacity", "raised", 125, 250, 0.5)]

    status, metrics = get(busy_worker, "/metrics")
    assert status == 200
    per_partition = re.findall(r'^sessions_live\{partition="(\d+)"\} (\S+)$', metrics, re.M)
    assert sum(float(v) for _, v in per_partition) == 220
    assert re.search(r"^sessions_records_emitted_total 220\.0$", metrics, re.M)
    assert re.search(r"^sessions_fragments_consumed_total 440\.0$", metrics, re.M)
    assert re.search(r"^sessions_max 250\.0$", metrics, re.M)
    assert re.search(r"^sessions_capacity_alarm 1\.0$", metrics, re.M)

    # SESSIONS_WEB_HOST=127.0.0.2: all of the above was answered there, and only there.
    assert busy_worker.web_host == "127.0.0.2"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", busy_worker.web_port), timeout=5).close()


def test_heap_snapshot_is_cached_for_the_interval_and_diffed(busy_worker: Worker) -> None:
    status, first = get(busy_worker, "/heap/?top=5")
    assert status == 200
    snapshot = json.loads(first)
    taken = snapshot["taken_at"]
    assert len(snapshot["rows"]) == 5
    assert "str" in [row["kind"] for row in snapshot["rows"]]
    _, again = get(busy_worker, "/heap/")
    assert json.loads(again)["taken_at"] == taken  # within the interval: the same snapshot
    deadline = time.monotonic() + 30
    while (later := json.loads(get(busy_worker, "/heap/?diff=baseline")[1]))["taken_at"] == taken:
        assert time.monotonic() < deadline, "the snapshot was never taken again"
        time.sleep(0.1)
    # Taken again only once the interval (SESSIONS_HEAP_MIN_INTERVAL=2) was over.
    assert later["taken_at"] >= taken + 2
    assert later["baseline_taken_at"] == taken
    assert isinstance(later["grown"], list)
    status, text = get(busy_worker, "/heap/?format=text")
    assert status == 200 and text.startswith("Partition of a set of")


def test_read_only_and_bad_parameters(busy_worker: Worker) -> None:
    for path in ("/sessions/", "/heap/", "/alarms/", "/metrics", "/", "/history/"):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            assert get(busy_worker, path, method)[0] == 405, (method, path)
    for path in (
        "/heap/?format=xml",
        "/heap/?diff=yesterday",
        "/heap/?top=0",
        "/heap/?top=x",
        "/sessions/?verbose=1",
    ):
        status, body = get(busy_worker, path)
        assert status == 400, path
        assert '"error"' in body
    # Faust's own views of table contents and cluster layout are off.
    for path in ("/table/", "/router/", "/stats/", "/graph/"):
        assert get(busy_worker, path)[0] == 404, path


def test_token_guards_heap_and_metrics(deployment: Deployment) -> None:
    deployment.env["SESSIONS_WEB_TOKEN"] = TOKEN
    worker = deployment.start_worker()
    for path in ("/heap/", "/metrics"):
        assert get(worker, path)[0] == 401
        assert get(worker, path, token="wrong-token-of-enough-length")[0] == 401
        assert get(worker, path, token=TOKEN)[0] == 200
    assert get(worker, "/sessions/")[0] == 200


def test_dashboard_in_chromium_shows_the_workers_numbers(busy_worker: Worker) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "Debian's chromium is installed by ./run setup"
    # Faust commits every few seconds: wait until the group has committed all it applied.
    busy_worker.wait_until(
        lambda s: (
            len(s["partitions"]) == 4 and all(p["lag"] == 0 for p in s["partitions"].values())
        ),
        "no lag left",
    )
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"http://{busy_worker.web_host}:{busy_worker.web_port}/",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    dom = done.stdout
    assert "updated" in dom, done.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom).group(1)  # type: ignore[union-attr]
    shown = dict(re.findall(r'data-chart-([a-z-]+)="([^"]*)"', body))
    assert shown["live-sessions"] == "220"
    assert shown["cap"] == "250"
    assert shown["alarm-line"] == "125"
    assert 10 < float(shown["rss-mib"]) < 2000
    assert re.search(r'id="live">220<', dom)
    assert re.search(r'id="alarm"[^>]*>raised<', dom)
    # Both charts drew every point, the last at the height of what the page shows.
    points = int(shown["points"])
    assert points >= 1
    assert (shown["sessions-drawn"], shown["memory-drawn"]) == (str(points), str(points))
    assert float(shown["sessions-drawn-last"]) == 220.0
    assert float(shown["memory-drawn-last"]) == float(shown["rss-mib"])
    # The input's charts: the rate of the 440 fragments of the last minute, and no lag.
    assert (shown["rate-drawn"], shown["lag-drawn"]) == (str(points), str(points))
    assert float(shown["rate"]) == pytest.approx(440 / 60, abs=0.3)
    assert float(shown["rate-drawn-last"]) == pytest.approx(float(shown["rate"]), abs=0.2)
    assert (shown["lag"], float(shown["lag-drawn-last"])) == ("0", 0.0)
    # The partitions and the census panels show the store's numbers.
    assert re.search(r'data-partitions-shown="4"', body)
    assert re.search(r'data-census-sessions="220"', body)
    partitions = re.search(r'<tbody id="partitions">(.*?)</tbody>', dom, re.S)
    assert partitions is not None and partitions.group(1).count("<tr>") == 4
    assert "stalled" not in partitions.group(1)
    census = re.search(r'<tbody id="census">(.*?)</tbody>', dom, re.S)
    assert census is not None and ">1-64<" in census.group(1)
