"""A bad setting stops the worker before it connects: exit 2, one line naming the variable."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("variable", "value"),
    [("SESSIONS_PARTITIONS", "many"), ("SESSIONS_DELIMITER", ""), ("SESSIONS_WEB_PORT", "0")],
)
def test_bad_setting_exits_2_with_one_line(variable: str, value: str) -> None:
    # A listening socket that must never see a connection from the worker.
    with socket.socket() as trap:
        trap.bind(("127.0.0.1", 0))
        trap.listen()
        trap.settimeout(0.2)
        port = trap.getsockname()[1]
        env = {**os.environ, "SESSIONS_BROKER_URL": f"kafka://127.0.0.1:{port}", variable: value}
        if value == "":
            env[variable] = "\\"  # a lone backslash is no delimiter
        done = subprocess.run(
            [sys.executable, "-m", "sessions_app", "worker"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        with pytest.raises(TimeoutError):
            trap.accept()
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"sessions-app: {variable}=")
