"""Settings from the environment: defaults, escapes, and one clear error per bad value."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sessions_app.settings import Settings, SettingsError

README = Path(__file__).resolve().parents[2] / "README.md"

#: Every row of README's Configuration table: variable -> (Settings field, default value).
DOCUMENTED_DEFAULTS: dict[str, tuple[str, object]] = {
    "SESSIONS_BROKER_URL": ("broker_url", "kafka://127.0.0.1:9092"),
    "SESSIONS_APP_ID": ("app_id", "sessions-app"),
    "SESSIONS_DATA_DIR": ("data_dir", "./sessions-data"),
    "SESSIONS_WEB_HOST": ("web_host", "127.0.0.1"),
    "SESSIONS_WEB_PORT": ("web_port", 6066),
    "SESSIONS_PARTITIONS": ("partitions", 8),
    "SESSIONS_DELIMITER": ("delimiter", b"\n"),
    "SESSIONS_INPUT_TOPIC": ("input_topic", "sessions-chunks"),
    "SESSIONS_OUTPUT_TOPIC": ("output_topic", "sessions-records"),
    "SESSIONS_EXPIRED_TOPIC": ("expired_topic", "sessions-expired"),
    "SESSIONS_DLQ_TOPIC": ("dlq_topic", "sessions-dlq"),
    "SESSIONS_BROKER_SESSION_TIMEOUT": ("broker_session_timeout", 10.0),
    "SESSIONS_BROKER_HEARTBEAT_INTERVAL": ("broker_heartbeat_interval", 3.0),
    "SESSIONS_PRODUCER_MAX_BATCH_SIZE": ("producer_max_batch_size", 524_288),
    "SESSIONS_ROCKSDB_MEMORY": ("rocksdb_memory", 134_217_728),
    "SESSIONS_IDLE_TIMEOUT": ("idle_timeout", 300.0),
    "SESSIONS_MAX_SESSIONS": ("max_sessions", 1_000_000),
    "SESSIONS_ALARM_RATIO": ("alarm_ratio", 0.8),
    "SESSIONS_CAP_POLICY": ("cap_policy", "evict"),
    "SESSIONS_MAX_BUFFER_BYTES": ("max_buffer_bytes", 1_000_000),
    "SESSIONS_ALERTS_TOPIC": ("alerts_topic", "sessions-alerts"),
    "SESSIONS_HEAP_MIN_INTERVAL": ("heap_min_interval", 30.0),
    "SESSIONS_STALL_TIMEOUT": ("stall_timeout", 60.0),
    "SESSIONS_WEB_TOKEN": ("web_token", None),
    "SESSIONS_STANDBY_REPLICAS": ("standby_replicas", 1),
    "SESSIONS_BATCH_FRAGMENTS": ("batch_fragments", 20_000),
    "SESSIONS_BROKER_SECURITY_PROTOCOL": ("broker_security_protocol", "PLAINTEXT"),
    "SESSIONS_SSL_CAFILE": ("ssl_cafile", None),
    "SESSIONS_SSL_CERTFILE": ("ssl_certfile", None),
    "SESSIONS_SSL_KEYFILE": ("ssl_keyfile", None),
    "SESSIONS_SSL_KEY_PASSWORD": ("ssl_key_password", None),
    "SESSIONS_SSL_CHECK_HOSTNAME": ("ssl_check_hostname", True),
    "SESSIONS_SASL_MECHANISM": ("sasl_mechanism", None),
    "SESSIONS_SASL_USERNAME": ("sasl_username", None),
    "SESSIONS_SASL_PASSWORD": ("sasl_password", None),
    "SESSIONS_SASL_PASSWORD_FILE": ("sasl_password", None),
}


def readme_configuration() -> dict[str, str]:
    """Return README's Configuration table: variable -> the default as written there."""
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented: dict[str, str] = {}
    # A row may name several variables: `SESSIONS_SSL_CERTFILE`, `SESSIONS_SSL_KEYFILE`.
    for names, default in re.findall(r"^\| (`SESSIONS_[^|]+) \| ([^|]+) \|", section, re.M):
        for variable in re.findall(r"`(SESSIONS_[A-Z_]+)`", names):
            documented[variable] = default.strip().strip("`")
    return documented


def test_defaults_are_the_documented_ones() -> None:
    settings = Settings.from_env({})
    assert {
        variable: getattr(settings, field) for variable, (field, _) in DOCUMENTED_DEFAULTS.items()
    } == {variable: value for variable, (_, value) in DOCUMENTED_DEFAULTS.items()}


def test_every_documented_variable_is_pinned_and_its_written_default_parses_to_it() -> None:
    documented = readme_configuration()
    assert set(documented) == set(DOCUMENTED_DEFAULTS)
    for variable, written in documented.items():
        field, value = DOCUMENTED_DEFAULTS[variable]
        if written == "unset":
            assert value is None, variable
        else:
            assert getattr(Settings.from_env({variable: written}), field) == value, variable


@pytest.mark.parametrize(
    ("variable", "raw", "expected"),
    [
        ("SESSIONS_MAX_BUFFER_BYTES", "100", 100),
        ("SESSIONS_MAX_BUFFER_BYTES", "100B", 100),
        ("SESSIONS_MAX_BUFFER_BYTES", "64KiB", 64 * 1024),
        ("SESSIONS_MAX_BUFFER_BYTES", "3 MiB", 3 * 1024 * 1024),
        ("SESSIONS_MAX_BUFFER_BYTES", "1GiB", 1024**3),
        ("SESSIONS_ROCKSDB_MEMORY", "16384KiB", 16 * 1024 * 1024),
        ("SESSIONS_ROCKSDB_MEMORY", "512MiB", 512 * 1024 * 1024),
        ("SESSIONS_ROCKSDB_MEMORY", "2GiB", 2 * 1024**3),
    ],
)
def test_sizes_in_bytes_kib_mib_gib(variable: str, raw: str, expected: int) -> None:
    field = DOCUMENTED_DEFAULTS[variable][0]
    assert getattr(Settings.from_env({variable: raw}), field) == expected


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("SESSIONS_MAX_BUFFER_BYTES", "1MB"),
        ("SESSIONS_MAX_BUFFER_BYTES", "1.5MiB"),
        ("SESSIONS_MAX_BUFFER_BYTES", "MiB"),
        ("SESSIONS_MAX_BUFFER_BYTES", "2GiB"),
        ("SESSIONS_MAX_BUFFER_BYTES", "0"),
        ("SESSIONS_ROCKSDB_MEMORY", "15MiB"),
        ("SESSIONS_ROCKSDB_MEMORY", "128mib"),
    ],
)
def test_sizes_outside_the_range_or_units_are_refused(variable: str, raw: str) -> None:
    with pytest.raises(SettingsError) as err:
        Settings.from_env({variable: raw})
    assert err.value.variable == variable
    assert "such as 1048576 or 128MiB" in str(err.value)


def test_web_token_needs_16_characters_and_no_space() -> None:
    assert Settings.from_env({"SESSIONS_WEB_TOKEN": "0123456789abcdef"}).web_token == (
        "0123456789abcdef"
    )
    for bad in ("0123456789abcde", "01234567 89abcdef", "0123456789abcdef\t"):
        with pytest.raises(SettingsError) as err:
            Settings.from_env({"SESSIONS_WEB_TOKEN": bad})
        assert err.value.variable == "SESSIONS_WEB_TOKEN"
        assert "at least 16 characters" in str(err.value)
        # The message ends up in logs: it never shows the token.
        assert bad.strip() not in str(err.value)


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
