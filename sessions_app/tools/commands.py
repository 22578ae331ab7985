"""Command-line tools beside `worker`: the embedded broker, the load generator, the verifier.

Found by Faust's autodiscover (sessions_app.app.DISCOVERED).
"""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import click
from faust.cli import AppCommand, option

from sessions_app.app import app
from sessions_app.tools import loadgen
from sessions_app.tools.embedded_broker import broker_command, create_topics

settings = app.settings


@app.command(
    option("--port", type=int, default=9092, show_default=True, help="TCP port on 127.0.0.1."),
)
async def broker(self: AppCommand, port: int) -> None:
    """Run the bundled Kafka-protocol broker (memory only) on 127.0.0.1."""
    command = broker_command(port)
    print(
        f"broker listening on 127.0.0.1:{port}: SESSIONS_BROKER_URL=kafka://127.0.0.1:{port}",
        flush=True,
    )
    os.execve(command[0], command, {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")})


@app.command(
    option("--sessions", type=int, default=1000, show_default=True),
    option("--records", type=int, default=20, show_default=True, help="Records per session."),
    option(
        "--manifest",
        type=click.Path(dir_okay=False),
        default="sessions-manifest.jsonl",
        show_default=True,
        help="Where to write what was sent.",
    ),
    option("--seed", type=int, default=None, help="Random seed (default: random)."),
    option(
        "--create-topics/--no-create-topics",
        default=True,
        show_default=True,
        help="Create the input topic with SESSIONS_PARTITIONS partitions if missing.",
    ),
)
async def produce(
    self: AppCommand,
    sessions: int,
    records: int,
    manifest: str,
    seed: int | None,
    create_topics: bool,
) -> None:
    """Send sessions of random binary records in random fragments; write a manifest."""
    if sessions < 1 or records < 1:
        raise click.UsageError("--sessions and --records must be at least 1")
    seed = secrets.randbits(32) if seed is None else seed
    run_id = f"run{seed:08x}"
    generated = loadgen.generate(run_id, sessions, records, settings.delimiter, seed)
    if create_topics:
        await _create_topics([settings.input_topic, settings.output_topic])
    started = time.time()
    loadgen.write_manifest(Path(manifest), run_id, settings.delimiter, generated, started)
    fragments, seconds = await loadgen.produce(
        settings.bootstrap_servers,
        settings.input_topic,
        generated,
        seed,
        progress=sys.stderr.isatty(),
        client_options=_security(),
    )
    print(
        f"sent {fragments} fragments of {sessions * records} records in {sessions} sessions "
        f"to {settings.input_topic} in {seconds:.2f}s ({fragments / seconds:,.0f} fragments/s); "
        f"manifest {manifest}"
    )


@app.command(
    option(
        "--manifest",
        type=click.Path(exists=True, dir_okay=False),
        default="sessions-manifest.jsonl",
        show_default=True,
    ),
    option(
        "--timeout",
        type=float,
        default=30.0,
        show_default=True,
        help="Give up after this many seconds without a new record.",
    ),
)
async def verify(self: AppCommand, manifest: str, timeout: float) -> None:
    """Check the output topic against a manifest; exit 1 on any loss or corruption."""
    header, expected = loadgen.read_manifest(Path(manifest))
    check = await loadgen.verify(
        settings.bootstrap_servers,
        settings.output_topic,
        loadgen.Verification(expected),
        idle_timeout=timeout,
        client_options=_security(),
    )
    print(check.summary())
    started = float(header["started"])
    if check.complete and check.last_timestamp_ms:
        elapsed = check.last_timestamp_ms / 1000 - started
        print(
            f"end to end: {check.expected_count} records, {header['fragments']} fragments in "
            f"{elapsed:.2f}s: {check.expected_count / elapsed:,.0f} records/s, "
            f"{int(header['fragments']) / elapsed:,.0f} fragments/s"
        )
    if not check.ok:
        raise SystemExit(1)


def _security() -> dict[str, Any]:
    """Return the client options beside the bootstrap servers: TLS and SASL, if configured."""
    options = settings.kafka_client_options()
    del options["bootstrap_servers"]
    return options


async def _create_topics(names: list[str]) -> None:
    await create_topics(
        ",".join(settings.bootstrap_servers), names, settings.partitions, **_security()
    )
