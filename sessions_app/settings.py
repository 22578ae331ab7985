"""Settings from SESSIONS_* environment variables: one frozen dataclass, validated up front.

Every error names the variable and what it allows, in one line, so a bad
deployment stops before the worker connects to anything.
"""

from __future__ import annotations

import codecs
import os
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

PREFIX = "SESSIONS_"
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9._-]+:\d{1,5}$|^\[[0-9A-Fa-f:.]+\]:\d{1,5}$")

T = TypeVar("T")


class SettingsError(ValueError):
    """A SESSIONS_* variable holds a value the worker cannot use."""

    def __init__(self, variable: str, value: str, allowed: str) -> None:
        super().__init__(f"{variable}={value!r} is invalid: {allowed}")
        self.variable = variable


@dataclass(frozen=True, slots=True)
class Tuning:
    """Values a worker is tuned with that no deployment has needed to change: named once here."""

    #: Records per fetch handed to the agent; with the fetches queued behind the one being
    #: applied, this bounds the fetched records a worker holds on its heap.
    fetch_max_records: int = 10_000
    #: Input records acked between two offset commits (Faust's `broker_commit_every`; the
    #: 2.8 s timer commits too). Faust's 10,000 meant a commit per batch, each through the
    #: consumer thread beside the fetches; each commit walks the acked offsets in one go.
    commit_every: int = 100_000
    #: Idle sessions expired per step of a sweep, under the buffers lock, so the agent
    #: keeps flowing between steps.
    sweep_batch: int = 1_000
    #: Longest time between sweeps; a quarter of SESSIONS_IDLE_TIMEOUT if that is shorter.
    sweep_interval: float = 1.0
    #: How long a crashed idle flush's remnant is looked for on the expired topic.
    flush_scan_timeout: float = 60.0
    #: The event-loop stall monitor's sleep, and the window of its recent maximum.
    stall_probe_period: float = 0.02
    stall_window: float = 10.0
    #: /livez fails when the stall probe has not woken up for this long.
    liveness_timeout: float = 10.0
    #: How often partition offsets are read from the broker and stalls looked for.
    progress_period: float = 2.0
    #: Sessions a census reads between looks at the clock, and how long one is reused.
    census_step: int = 256
    census_min_interval: float = 30.0
    #: The dashboard's history: a sample every period, an hour of them.
    history_period: float = 10.0
    history_samples: int = 360


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a worker is configured with; see README for each variable."""

    broker_url: str = "kafka://127.0.0.1:9092"
    app_id: str = "sessions-app"
    data_dir: str = "./sessions-data"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    partitions: int = 8
    delimiter: bytes = b"\n"
    input_topic: str = "sessions-chunks"
    output_topic: str = "sessions-records"
    expired_topic: str = "sessions-expired"
    dlq_topic: str = "sessions-dlq"
    broker_session_timeout: float = 10.0
    broker_heartbeat_interval: float = 3.0
    # aiokafka has one produce request in flight per broker: a batch of records to a
    # partition that needs several producer batches waits a round trip for each.
    producer_max_batch_size: int = 512 * 1024
    rocksdb_memory: int = 128 * 1024 * 1024
    idle_timeout: float = 300.0
    max_sessions: int = 1_000_000
    alarm_ratio: float = 0.8
    cap_policy: str = "evict"
    # With a session ID and headers, a record this big fits Kafka's default 1,048,588-byte
    # max.message.bytes (sessions_app/core/limits.py).
    max_buffer_bytes: int = 1_000_000
    alerts_topic: str = "sessions-alerts"
    heap_min_interval: float = 30.0
    stall_timeout: float = 60.0
    web_token: str | None = field(default=None, repr=False)
    standby_replicas: int = 1
    batch_fragments: int = 20_000
    # Secured Kafka: TLS and SASL for every client the worker and its commands make.
    broker_security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)
    ssl_check_hostname: bool = True
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    tuning: Tuning = Tuning()

    def kafka_client_options(self) -> dict[str, Any]:
        """Return the connection options every Kafka client the worker makes is given."""
        protocol = self.broker_security_protocol
        options: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap_servers,
            "security_protocol": protocol,
        }
        if protocol.endswith("SSL"):
            options["ssl_context"] = self.ssl_context()
        if protocol.startswith("SASL"):
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options

    @property
    def web_advertised_host(self) -> str:
        """Return the host name the worker gives for its web server: the bound one, or, for a
        wildcard bind (0.0.0.0, ::), the machine's host name (a container's, in docker/)."""
        if self.web_host in {"0.0.0.0", "::", ""}:
            return socket.gethostname()
        return self.web_host

    @property
    def sweep_interval(self) -> float:
        """Return the seconds between idle sweeps."""
        return min(self.tuning.sweep_interval, self.idle_timeout / 4)

    @property
    def intake_depth(self) -> int:
        """Return how many fetches may wait behind the batch being applied.

        A batch's worth and one more (three of 10,000 behind batches of 20,000; with the
        fetch waiting to be queued, two batches). The consumer thread parses each fetch
        beside the agent, sharing the interpreter lock with it: with only the next batch
        queued, the agent waited about 33 ms of every 210 for it.
        """
        return max(1, self.batch_fragments // self.tuning.fetch_max_records + 1)

    @property
    def bootstrap_servers(self) -> list[str]:
        """Return the broker list as host:port strings, the form Kafka clients take."""
        return [part.removeprefix("kafka://") for part in self.broker_url.split(";")]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every SESSIONS_* variable; raise SettingsError on the first bad one."""
        env = os.environ if environ is None else environ
        d = cls()

        def get(name: str, parse: Callable[[str, str], T], default: T) -> T:
            variable = PREFIX + name
            raw = env.get(variable)
            if raw is None or raw == "":
                return default
            return parse(variable, raw)

        settings = cls(
            broker_url=get("BROKER_URL", _broker_url, d.broker_url),
            app_id=get("APP_ID", _topic_name, d.app_id),
            data_dir=get("DATA_DIR", _text, d.data_dir),
            web_host=get("WEB_HOST", _text, d.web_host),
            web_port=get("WEB_PORT", _int_range(1, 65535), d.web_port),
            partitions=get("PARTITIONS", _int_range(1, 10_000), d.partitions),
            delimiter=get("DELIMITER", parse_delimiter, d.delimiter),
            input_topic=get("INPUT_TOPIC", _topic_name, d.input_topic),
            output_topic=get("OUTPUT_TOPIC", _topic_name, d.output_topic),
            expired_topic=get("EXPIRED_TOPIC", _topic_name, d.expired_topic),
            dlq_topic=get("DLQ_TOPIC", _topic_name, d.dlq_topic),
            broker_session_timeout=get(
                "BROKER_SESSION_TIMEOUT", _float_range(1.0, 3600.0), d.broker_session_timeout
            ),
            broker_heartbeat_interval=get(
                "BROKER_HEARTBEAT_INTERVAL", _float_range(0.1, 3600.0), d.broker_heartbeat_interval
            ),
            producer_max_batch_size=get(
                "PRODUCER_MAX_BATCH_SIZE",
                _int_range(1, 64 * 1024 * 1024),
                d.producer_max_batch_size,
            ),
            rocksdb_memory=get("ROCKSDB_MEMORY", _size(16 * 1024**2, 1024**4), d.rocksdb_memory),
            idle_timeout=get("IDLE_TIMEOUT", _float_range(0.1, 365 * 86400.0), d.idle_timeout),
            max_sessions=get("MAX_SESSIONS", _int_range(1, 10**10), d.max_sessions),
            alarm_ratio=get("ALARM_RATIO", _float_range(0.1, 1.0), d.alarm_ratio),
            cap_policy=get("CAP_POLICY", _choice("evict", "reject"), d.cap_policy),
            max_buffer_bytes=get("MAX_BUFFER_BYTES", _size(1, 1024**3), d.max_buffer_bytes),
            alerts_topic=get("ALERTS_TOPIC", _topic_name, d.alerts_topic),
            heap_min_interval=get(
                "HEAP_MIN_INTERVAL", _float_range(1.0, 86400.0), d.heap_min_interval
            ),
            stall_timeout=get("STALL_TIMEOUT", _float_range(1.0, 86400.0), d.stall_timeout),
            web_token=get("WEB_TOKEN", _token, d.web_token),
            standby_replicas=get("STANDBY_REPLICAS", _int_range(0, 10), d.standby_replicas),
            batch_fragments=get(
                "BATCH_FRAGMENTS", _int_range(10_000, 1_000_000), d.batch_fragments
            ),
            broker_security_protocol=get(
                "BROKER_SECURITY_PROTOCOL", _choice(*SECURITY_PROTOCOLS), "PLAINTEXT"
            ),
            ssl_cafile=get("SSL_CAFILE", _readable_file, None),
            ssl_certfile=get("SSL_CERTFILE", _readable_file, None),
            ssl_keyfile=get("SSL_KEYFILE", _readable_file, None),
            ssl_key_password=get("SSL_KEY_PASSWORD", _secret, None),
            ssl_check_hostname=get("SSL_CHECK_HOSTNAME", _boolean, True),
            sasl_mechanism=get("SASL_MECHANISM", _choice(*SASL_MECHANISMS), None),
            sasl_username=get("SASL_USERNAME", _text, None),
            sasl_password=_sasl_password(env),
        )
        settings._check_together()
        # A TLS file or SASL credential the protocol does not use is a mistake worth stopping
        # for; SSL_CHECK_HOSTNAME, a switch with a default, is not.
        given = {
            name.removeprefix(PREFIX)
            for name, raw in env.items()
            if raw and name.startswith((PREFIX + "SSL_", PREFIX + "SASL_"))
        }
        settings._check_security(given - {"SSL_CHECK_HOSTNAME"})
        return settings

    def _check_security(self, given: set[str]) -> None:
        """Check the TLS and SASL settings together; `given` names the variables set."""
        protocol = self.broker_security_protocol
        variable = PREFIX + "BROKER_SECURITY_PROTOCOL"
        for name in sorted(given):
            unused = (name.startswith("SSL_") and not protocol.endswith("SSL")) or (
                name.startswith("SASL_") and not protocol.startswith("SASL")
            )
            if unused:
                what = "TLS (use SSL or SASL_SSL)" if name.startswith("SSL_") else "SASL"
                if name.startswith("SASL_"):
                    what += " (use SASL_PLAINTEXT or SASL_SSL)"
                raise SettingsError(
                    PREFIX + name,
                    "<hidden>" if "PASSWORD" in name and "FILE" not in name else _given(self, name),
                    f"must not be set: {variable}={protocol} does not use {what}",
                )
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            present = "SSL_CERTFILE" if self.ssl_certfile is not None else "SSL_KEYFILE"
            missing = "SSL_KEYFILE" if present == "SSL_CERTFILE" else "SSL_CERTFILE"
            raise SettingsError(
                PREFIX + missing, "", f"must be set with {PREFIX}{present} (mutual TLS takes both)"
            )
        if self.ssl_key_password is not None and self.ssl_keyfile is None:
            raise SettingsError(
                PREFIX + "SSL_KEY_PASSWORD",
                "<hidden>",
                "must be set only with SESSIONS_SSL_KEYFILE, the key it opens",
            )
        if protocol.startswith("SASL"):
            required = {
                "SASL_MECHANISM": self.sasl_mechanism,
                "SASL_USERNAME": self.sasl_username,
                "SASL_PASSWORD": self.sasl_password,
            }
            for name, value in required.items():
                if value is None:
                    what = " (or SESSIONS_SASL_PASSWORD_FILE)" if name == "SASL_PASSWORD" else ""
                    raise SettingsError(
                        PREFIX + name, "", f"must be set with {variable}={protocol}{what}"
                    )
        if protocol.endswith("SSL"):
            self.ssl_context()  # a certificate, key or password that cannot be used stops here

    def ssl_context(self) -> ssl.SSLContext:
        """Return the TLS context for the broker; raise SettingsError naming what is wrong."""
        try:
            context = ssl.create_default_context(cafile=self.ssl_cafile)
        except (ssl.SSLError, OSError) as exc:
            raise SettingsError(
                PREFIX + "SSL_CAFILE", str(self.ssl_cafile), f"holds no usable CA ({exc})"
            ) from None
        context.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile is not None:
            try:
                context.load_cert_chain(
                    self.ssl_certfile, self.ssl_keyfile, password=self.ssl_key_password
                )
            except (ssl.SSLError, OSError) as exc:
                raise SettingsError(
                    PREFIX + "SSL_CERTFILE",
                    self.ssl_certfile,
                    f"and {PREFIX}SSL_KEYFILE={self.ssl_keyfile!r} are not a usable certificate "
                    f"and key (wrong pair, or SESSIONS_SSL_KEY_PASSWORD?): {exc}",
                ) from None
        return context

    def _check_together(self) -> None:
        if self.broker_heartbeat_interval >= self.broker_session_timeout:
            raise SettingsError(
                PREFIX + "BROKER_HEARTBEAT_INTERVAL",
                str(self.broker_heartbeat_interval),
                f"must be less than SESSIONS_BROKER_SESSION_TIMEOUT "
                f"({self.broker_session_timeout}); a third of it is usual",
            )
        topics = {
            "SESSIONS_INPUT_TOPIC": self.input_topic,
            "SESSIONS_OUTPUT_TOPIC": self.output_topic,
            "SESSIONS_EXPIRED_TOPIC": self.expired_topic,
            "SESSIONS_DLQ_TOPIC": self.dlq_topic,
            "SESSIONS_ALERTS_TOPIC": self.alerts_topic,
        }
        seen: dict[str, str] = {}
        for variable, topic in topics.items():
            if topic in seen:
                raise SettingsError(
                    variable, topic, f"must differ from {seen[topic]}, which names the same topic"
                )
            seen[topic] = variable


def parse_delimiter(variable: str, raw: str) -> bytes:
    """Turn a delimiter setting with escapes (\\n, \\r\\n, \\x00) into bytes."""
    allowed = "must be one or more bytes; escapes \\n \\r \\t \\\\ \\xHH are understood"
    try:
        value: bytes = codecs.escape_decode(raw.encode("utf-8"))[0]
    except ValueError as exc:
        raise SettingsError(variable, raw, f"{allowed} ({exc})") from None
    if not value:
        raise SettingsError(variable, raw, allowed)
    return value


SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _given(settings: Settings, name: str) -> str:
    """Return a security variable's value as given, for an error line (never a secret)."""
    value = getattr(settings, name.lower(), None)
    return str(value) if value is not None else ""


def _readable_file(variable: str, raw: str) -> str:
    try:
        with open(raw, "rb"):
            pass
    except OSError as exc:
        raise SettingsError(variable, raw, f"must be a readable file ({exc.strerror})") from None
    return raw


def _secret(variable: str, raw: str) -> str:
    return raw


def _boolean(variable: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"true", "1", "yes"}:
        return True
    if value in {"false", "0", "no"}:
        return False
    raise SettingsError(variable, raw, "must be true or false")


def _sasl_password(env: Mapping[str, str]) -> str | None:
    """Return the SASL password, given itself or as a file (a mounted secret), not both."""
    given = env.get(PREFIX + "SASL_PASSWORD") or None
    path = env.get(PREFIX + "SASL_PASSWORD_FILE") or None
    if given is not None and path is not None:
        raise SettingsError(
            PREFIX + "SASL_PASSWORD_FILE", path, "must not be set with SESSIONS_SASL_PASSWORD"
        )
    if path is None:
        return given
    _readable_file(PREFIX + "SASL_PASSWORD_FILE", path)
    with open(path, encoding="utf-8") as secret:
        password = secret.read().rstrip("\r\n")
    if not password:
        raise SettingsError(PREFIX + "SASL_PASSWORD_FILE", path, "must not be empty")
    return password


def _token(variable: str, raw: str) -> str:
    if len(raw) < 16 or any(c.isspace() for c in raw):
        raise SettingsError(variable, "<hidden>", "must be at least 16 characters, no spaces")
    return raw


def _text(variable: str, raw: str) -> str:
    return raw


def _topic_name(variable: str, raw: str) -> str:
    if not _TOPIC_NAME.match(raw) or raw in {".", ".."}:
        raise SettingsError(
            variable, raw, "must be 1-249 characters of letters, digits, '.', '_' or '-'"
        )
    return raw


def _broker_url(variable: str, raw: str) -> str:
    allowed = "must be kafka://HOST:PORT, several joined by ';' (kafka://a:9092;b:9092)"
    if not raw.startswith("kafka://"):
        raise SettingsError(variable, raw, allowed)
    for part in raw.split(";"):
        if not _HOST_PORT.match(part.removeprefix("kafka://")):
            raise SettingsError(variable, raw, allowed)
    return raw


_SIZE = re.compile(r"^\s*(\d+)\s*(|B|KiB|MiB|GiB|TiB)\s*$")
_UNITS = {"": 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "TiB": 1024**4}


def _size(low: int, high: int) -> Callable[[str, str], int]:
    def parse(variable: str, raw: str) -> int:
        allowed = f"must be a size in bytes from {low:,} to {high:,}, such as 1048576 or 128MiB"
        match = _SIZE.match(raw)
        if not match:
            raise SettingsError(variable, raw, allowed)
        value = int(match.group(1)) * _UNITS[match.group(2)]
        if not low <= value <= high:
            raise SettingsError(variable, raw, allowed)
        return value

    return parse


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(variable: str, raw: str) -> str:
        if raw not in choices:
            raise SettingsError(variable, raw, "must be one of " + ", ".join(choices))
        return raw

    return parse


def _int_range(low: int, high: int) -> Callable[[str, str], int]:
    def parse(variable: str, raw: str) -> int:
        allowed = f"must be a whole number from {low:,} to {high:,}"
        try:
            value = int(raw.replace("_", ""))
        except ValueError:
            raise SettingsError(variable, raw, allowed) from None
        if not low <= value <= high:
            raise SettingsError(variable, raw, allowed)
        return value

    return parse


def _float_range(low: float, high: float) -> Callable[[str, str], float]:
    def parse(variable: str, raw: str) -> float:
        allowed = f"must be a number of seconds from {low:g} to {high:g}"
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(variable, raw, allowed) from None
        if not low <= value <= high:
            raise SettingsError(variable, raw, allowed)
        return value

    return parse
