"""The first contact with the broker: partition counts, and a clear word when it refuses us.

A worker reads the partition counts of its topics before it consumes (see
sessions_app/stream/topics.py). That is also the first connection through
TLS and SASL, so a refusal there is turned into one line that names the
setting to look at, instead of a client's retries and tracebacks: aiokafka
reports a failed TLS handshake only as "Unable to bootstrap", so the
handshake is tried again by itself to learn why.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from sessions_app.core.limits import KAFKA_DEFAULT_MAX_MESSAGE_BYTES
from sessions_app.settings import Settings

logger = logging.getLogger(__name__)

#: How long the first contact may take before the worker gives up with a message.
CONNECT_TIMEOUT = 30.0


class BrokerRefused(RuntimeError):
    """The broker cannot be used now; the message says which settings to check.

    `exit_status` is 2 when the settings keep the worker out (TLS, SASL), as for
    any bad setting, and 1 when the broker could not be reached at all.
    """

    def __init__(self, message: str, exit_status: int = 2) -> None:
        super().__init__(message)
        self.exit_status = exit_status


async def partition_counts(settings: Settings, names: list[str]) -> dict[str, int | None]:
    """Return each topic's partition count, None for a topic that does not exist.

    Raise BrokerRefused when TLS or SASL settings keep the worker out.
    """
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(enable_auto_commit=False, **settings.kafka_client_options())
    try:
        await asyncio.wait_for(consumer.start(), CONNECT_TIMEOUT)
        existing = await consumer.topics()
    except Exception as exc:
        await consumer.stop()
        raise await _refusal(settings, exc) from exc
    try:
        counts: dict[str, int | None] = {}
        for name in names:
            partitions = consumer.partitions_for_topic(name) if name in existing else None
            counts[name] = len(partitions) if partitions else None
        return counts
    finally:
        await consumer.stop()


async def record_limits(settings: Settings, topics: list[str]) -> dict[str, int]:
    """Return each topic's `max.message.bytes` as the broker reports it.

    A topic that does not exist yet, or for which the broker reports nothing, gets
    the broker's `message.max.bytes`, and failing that Kafka's default.
    """
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    options = settings.kafka_client_options()
    admin = AIOKafkaAdminClient(**options)
    await asyncio.wait_for(admin.start(), CONNECT_TIMEOUT)
    try:
        existing = set(await admin.list_topics())
        asked = [
            ConfigResource(ConfigResourceType.TOPIC, name, None)
            for name in topics
            if name in existing
        ]
        found: dict[str, int] = {}
        for response in await admin.describe_configs(asked) if asked else []:
            for error_code, error_message, _, name, entries in response.resources:
                if error_code:  # an ACL that denies DescribeConfigs, say
                    logger.warning(
                        "The broker did not describe %s (%s: %s)", name, error_code, error_message
                    )
                for key, value, *_ in entries:
                    if key == "max.message.bytes" and value:
                        found[name] = int(value)
        default = KAFKA_DEFAULT_MAX_MESSAGE_BYTES
        if len(found) < len(topics):
            default = await _broker_message_max_bytes(admin) or default
            logger.info(
                "max.message.bytes not reported for %s: assuming %d",
                ", ".join(name for name in topics if name not in found),
                default,
            )
        return {name: found.get(name, default) for name in topics}
    finally:
        await admin.close()


async def _broker_message_max_bytes(admin: Any) -> int | None:
    """Return a broker's `message.max.bytes`, or None if it does not say."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    cluster = await admin.describe_cluster()
    brokers = cluster.get("brokers") or []
    if not brokers:
        return None
    resource = ConfigResource(ConfigResourceType.BROKER, str(brokers[0]["node_id"]), None)
    try:
        responses = await admin.describe_configs([resource])
    except Exception:  # a broker that does not describe itself: Kafka's default applies
        return None
    for response in responses:
        for _, _, _, _, entries in response.resources:
            for key, value, *_ in entries:
                if key == "message.max.bytes" and value:
                    return int(value)
    return None


async def _refusal(settings: Settings, error: Exception) -> BrokerRefused:
    """Return why the first contact failed, naming the settings to check."""
    url = f"SESSIONS_BROKER_URL={settings.broker_url}"
    protocol = settings.broker_security_protocol
    if not await _reachable(settings):
        return BrokerRefused(
            f"cannot reach the broker at {url}: {type(error).__name__}: {error}", exit_status=1
        )
    if protocol.endswith("SSL"):
        reason = await _tls_handshake_failure(settings)
        if reason is not None:
            return BrokerRefused(f"TLS with the broker at {url} failed: {reason}")
    if protocol.startswith("SASL"):
        return BrokerRefused(
            f"the broker at {url} did not accept SASL {settings.sasl_mechanism} for user "
            f"{settings.sasl_username!r} ({type(error).__name__}: {error}); check "
            "SESSIONS_SASL_USERNAME, SESSIONS_SASL_PASSWORD and SESSIONS_SASL_MECHANISM"
        )
    return BrokerRefused(
        f"cannot reach the broker at {url} with SESSIONS_BROKER_SECURITY_PROTOCOL={protocol}: "
        f"{type(error).__name__}: {error}",
        exit_status=1,
    )


async def _reachable(settings: Settings) -> bool:
    """Tell whether a TCP connection to the first bootstrap server opens at all."""
    host, _, port = settings.bootstrap_servers[0].rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), CONNECT_TIMEOUT
        )
    except (TimeoutError, OSError):
        return False
    writer.close()
    return True


async def _tls_handshake_failure(settings: Settings) -> str | None:
    """Shake hands with the first bootstrap server alone; return why it failed, or None."""
    host, _, port = settings.bootstrap_servers[0].rpartition(":")
    host = host.strip("[]")
    context = settings.ssl_context()
    refused = (
        "the broker refused the handshake ({}); mutual TLS needs SESSIONS_SSL_CERTFILE and "
        "SESSIONS_SSL_KEYFILE with a certificate it trusts"
    )
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=context), CONNECT_TIMEOUT
        )
    except ssl.SSLCertVerificationError as exc:
        hint = "SESSIONS_SSL_CAFILE"
        if "hostname" in str(exc.verify_message) or "match" in str(exc.verify_message):
            hint += " (or SESSIONS_SSL_CHECK_HOSTNAME for a name the certificate lacks)"
        return f"the broker's certificate is not trusted ({exc.verify_message}); check {hint}"
    except ssl.SSLError as exc:
        return refused.format(exc.reason)
    except (TimeoutError, OSError):
        return None  # not a TLS matter: the broker is unreachable
    try:
        # A TLS 1.3 server checks a client certificate after the handshake: it hangs up then.
        await asyncio.wait_for(reader.read(1), 0.5)
    except ssl.SSLError as exc:
        return refused.format(exc.reason)
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()
    return None
