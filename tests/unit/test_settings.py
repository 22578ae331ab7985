"""Settings from the environment: defaults, escapes, and one clear error per bad value."""

from __future__ import annotations

import pytest

from sessions_app.settings import Settings, SettingsError


def test_defaults() -> None:
    s = Settings.from_env({})
    assert s == Settings()
    assert (s.input_topic, s.output_topic, s.expired_topic, s.dlq_topic) == (
        "sessions-chunks",
        "sessions-records",
        "sessions-expired",
        "sessions-dlq",
    )
    assert (s.partitions, s.web_host, s.web_port, s.delimiter) == (8, "127.0.0.1", 6066, b"\n")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("\\n", b"\n"), ("\\r\\n", b"\r\n"), ("\\x00", b"\x00"), ("||", b"||"), ("\\\\", b"\\")],
)
def test_delimiter_escapes(raw: str, expected: bytes) -> None:
    assert Settings.from_env({"SESSIONS_DELIMITER": raw}).delimiter == expected


def test_broker_list() -> None:
    s = Settings.from_env({"SESSIONS_BROKER_URL": "kafka://a:9092;b:9093"})
    assert s.bootstrap_servers == ["a:9092", "b:9093"]


@pytest.mark.parametrize(
    ("variable", "value", "allowed"),
    [
        ("SESSIONS_PARTITIONS", "zero", "whole number from 1 to 10,000"),
        ("SESSIONS_PARTITIONS", "0", "whole number"),
        ("SESSIONS_WEB_PORT", "70000", "from 1 to 65,535"),
        ("SESSIONS_DELIMITER", "\\x0", "escapes"),
        ("SESSIONS_BROKER_URL", "localhost:9092", "kafka://HOST:PORT"),
        ("SESSIONS_INPUT_TOPIC", "bad topic", "letters, digits"),
        ("SESSIONS_APP_ID", "a/b", "letters, digits"),
        ("SESSIONS_BROKER_SESSION_TIMEOUT", "-1", "seconds"),
        ("SESSIONS_PRODUCER_MAX_BATCH_SIZE", "1.5", "whole number"),
        ("SESSIONS_BATCH_FRAGMENTS", "5000", "from 10,000 to 1,000,000"),
    ],
)
def test_bad_value_names_the_variable(variable: str, value: str, allowed: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({variable: value})
    assert err.value.variable == variable
    message = str(err.value)
    assert message.startswith(f"{variable}={value!r} is invalid")
    assert allowed in message
    assert "\n" not in message


def test_topics_must_differ() -> None:
    with pytest.raises(SettingsError, match=r"SESSIONS_DLQ_TOPIC.*SESSIONS_OUTPUT_TOPIC"):
        Settings.from_env({"SESSIONS_DLQ_TOPIC": "sessions-records"})


def test_heartbeat_below_session_timeout() -> None:
    with pytest.raises(SettingsError, match="SESSIONS_BROKER_HEARTBEAT_INTERVAL"):
        Settings.from_env(
            {"SESSIONS_BROKER_SESSION_TIMEOUT": "2", "SESSIONS_BROKER_HEARTBEAT_INTERVAL": "2"}
        )
