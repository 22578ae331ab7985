"""A worker refuses topics that would split a session from its buffer, or refuse its records."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

from sessions_app.tools.embedded_broker import create_topics_sync, free_port

from .conftest import Deployment


def start_worker_expecting_exit(deployment: Deployment) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **deployment.env,
        "SESSIONS_DATA_DIR": str(deployment.root / "data"),
        "SESSIONS_WEB_PORT": str(free_port()),
    }
    return subprocess.run(
        [sys.executable, "-m", "sessions_app", "worker", "-l", "info"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def refusal(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if "not co-partitioned" in line]


def test_an_input_topic_with_another_partition_count_stops_the_worker(
    deployment: Deployment,
) -> None:
    topic = deployment.env["SESSIONS_INPUT_TOPIC"] + "-six"
    create_topics_sync(deployment.broker.bootstrap, [topic], 6)
    deployment.env["SESSIONS_INPUT_TOPIC"] = topic
    result = start_worker_expecting_exit(deployment)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = refusal(result)
    assert f"SESSIONS_PARTITIONS=4: {topic} has 6 partitions" in line
    # Records go to the input's partition: outputs of 4 cannot take those of partitions 4, 5.
    assert deployment.env["SESSIONS_OUTPUT_TOPIC"] + " has 4 partitions" in line


def test_a_changelog_with_another_partition_count_stops_the_worker(
    deployment: Deployment,
) -> None:
    changelog = deployment.env["SESSIONS_APP_ID"] + "-session_buffers-changelog"
    create_topics_sync(deployment.broker.bootstrap, [changelog], 2)
    result = start_worker_expecting_exit(deployment)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = refusal(result)
    assert f"{changelog} has 2 partitions" in line
    assert deployment.env["SESSIONS_INPUT_TOPIC"] + " has" not in line


def create_with_limit(bootstrap: str, topic: str, max_message_bytes: int) -> None:
    async def create() -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            config = {"max.message.bytes": str(max_message_bytes)}
            await admin.create_topics([NewTopic(topic, 4, 1, topic_configs=config)])
        finally:
            await admin.close()

    asyncio.run(create())


def test_a_cap_whose_records_a_topic_would_refuse_stops_the_worker(
    deployment: Deployment,
) -> None:
    # The test broker enforces no size limit, but it reports a topic's max.message.bytes:
    # the worker must know before Kafka would refuse a record.
    topic = deployment.env["SESSIONS_OUTPUT_TOPIC"] + "-small"
    create_with_limit(deployment.broker.bootstrap, topic, 100_000)
    deployment.env["SESSIONS_OUTPUT_TOPIC"] = topic
    deployment.env["SESSIONS_MAX_BUFFER_BYTES"] = "200000"
    result = start_worker_expecting_exit(deployment)
    assert result.returncode == 2, result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if "SESSIONS_MAX_BUFFER_BYTES=" in line]
    assert "SESSIONS_MAX_BUFFER_BYTES='200000' is invalid" in line
    assert f"{topic} takes at most 100,000" in line
    # The cap it names is one the topic takes: the worker starts with it.
    fitting = re.search(r"lower the cap to ([\d,]+)", line)
    assert fitting is not None
    deployment.env["SESSIONS_MAX_BUFFER_BYTES"] = fitting.group(1).replace(",", "")
    worker = deployment.start_worker()
    assert worker.stats()["live_sessions"] == 0


def test_a_dead_letter_larger_than_its_topic_takes_is_cut_to_fit_and_says_so(
    deployment: Deployment,
) -> None:
    topic = deployment.env["SESSIONS_DLQ_TOPIC"] + "-small"
    create_with_limit(deployment.broker.bootstrap, topic, 2_000)
    deployment.env["SESSIONS_DLQ_TOPIC"] = topic
    deployment.start_worker()
    # A fragment without a key is dead-lettered; it is larger than the topic takes.
    deployment.produce([(None, b"v" * 5_000, 0), (b"ok", b"fine\r\n", 0)])
    (letter,) = deployment.read("dlq", 1)
    assert letter.headers["error.stage"] == b"validate"
    assert letter.headers["error.value.bytes"] == b"5000"
    assert letter.value is not None and 0 < len(letter.value) < 2_000
    assert letter.value == b"v" * len(letter.value)  # the head of the fragment, as it was
    (record,) = deployment.read("output", 1)
    assert record.value == b"fine"
