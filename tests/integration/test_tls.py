"""A worker through TLS, against a real TLS endpoint: mutual TLS, and clear refusals.

The embedded broker's own TLS options do not work (tansu 0.6.0 refuses --cert
with --key), so stunnel, from Debian's packages (./run installs it), stands in
front of it as a TLS-terminating proxy that requires a client certificate
signed by the test CA, and the broker advertises the proxy's address. Every
client, the worker's and the commands', goes through the proxy.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sessions_app.tools.embedded_broker import (
    EmbeddedBroker,
    create_topics_sync,
    free_port,
    wait_until_listening,
)


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(root: Path) -> Certificates:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed; another CA."""
    for ca in ("ca", "other-ca"):
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-subj", f"/CN=sessions-test-{ca}",
            cwd=root,
        )  # fmt: skip
    (root / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name, extra in (("server", ["-extfile", "server.ext"]), ("client", [])):
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key",
            "-out", f"{name}.csr", "-subj", f"/CN=sessions-test-{name}",
            cwd=root,
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-out", f"{name}.crt", *extra,
            cwd=root,
        )  # fmt: skip
    return Certificates(
        root / "ca.crt",
        root / "server.crt",
        root / "server.key",
        root / "client.crt",
        root / "client.key",
        root / "other-ca.crt",
    )


@dataclass
class TLSBroker:
    port: int
    certificates: Certificates

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """Settings of a client that presents the client certificate."""
        return {
            "SESSIONS_BROKER_URL": self.url,
            "SESSIONS_BROKER_SECURITY_PROTOCOL": "SSL",
            "SESSIONS_SSL_CAFILE": str(self.certificates.ca),
            "SESSIONS_SSL_CERTFILE": str(self.certificates.client_cert),
            "SESSIONS_SSL_KEYFILE": str(self.certificates.client_key),
        }


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSBroker]:
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel")
    assert stunnel, "Debian's stunnel4 is installed by ./run setup"
    root = tmp_path_factory.mktemp("tls")
    certificates = make_certificates(root)
    proxy_port = free_port()
    config = root / "stunnel.conf"
    config.write_text(
        "foreground = yes\n"
        f"pid = {root / 'stunnel.pid'}\n"
        "[kafka]\n"
        f"accept = 127.0.0.1:{proxy_port}\n"
        "connect = 127.0.0.1:{broker_port}\n"
        f"cert = {certificates.server_cert}\n"
        f"key = {certificates.server_key}\n"
        f"CAfile = {certificates.ca}\n"
        # Mutual TLS: a client must present a certificate the test CA signed.
        "requireCert = yes\n"
        "verifyChain = yes\n"
    )
    with EmbeddedBroker(advertised_port=proxy_port) as broker:
        config.write_text(config.read_text().replace("{broker_port}", str(broker.port)))
        log = (root / "stunnel.log").open("wb")
        proxy = subprocess.Popen([stunnel, str(config)], stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_until_listening(proxy_port)
            yield TLSBroker(proxy_port, certificates)
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
            log.close()


def deployment_env(tls: TLSBroker, name: str, root: Path) -> dict[str, str]:
    env = {
        **os.environ,
        **tls.client_env(),
        "SESSIONS_APP_ID": f"tls-{name}",
        "SESSIONS_PARTITIONS": "2",
        "SESSIONS_DATA_DIR": str(root / f"data-{name}"),
        "SESSIONS_WEB_PORT": str(free_port()),
        "SESSIONS_BROKER_SESSION_TIMEOUT": "2",
        "SESSIONS_BROKER_HEARTBEAT_INTERVAL": "0.5",
    }
    for variable, topic in (
        ("INPUT", "chunks"),
        ("OUTPUT", "records"),
        ("EXPIRED", "expired"),
        ("DLQ", "dlq"),
        ("ALERTS", "alerts"),
    ):
        env[f"SESSIONS_{variable}_TOPIC"] = f"tls-{name}-{topic}"
    return env


def run(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sessions_app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(result: subprocess.CompletedProcess[str], needle: str) -> str:
    (line,) = [line for line in result.stderr.splitlines() if needle in line]
    return line


def test_a_broker_certificate_from_another_ca_is_refused_naming_the_ca_setting(
    tls_broker: TLSBroker, tmp_path: Path
) -> None:
    env = deployment_env(tls_broker, "wrong-ca", tmp_path)
    env["SESSIONS_SSL_CAFILE"] = str(tls_broker.certificates.other_ca)
    result = run(env, "worker", "-l", "info")
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line(result, "sessions-app: TLS with the broker")
    assert "certificate is not trusted" in line
    assert "SESSIONS_SSL_CAFILE" in line


def test_a_worker_without_a_client_certificate_is_refused_naming_the_certificate_settings(
    tls_broker: TLSBroker, tmp_path: Path
) -> None:
    env = deployment_env(tls_broker, "no-client-cert", tmp_path)
    del env["SESSIONS_SSL_CERTFILE"], env["SESSIONS_SSL_KEYFILE"]
    result = run(env, "worker", "-l", "info")
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line(result, "sessions-app: TLS with the broker")
    assert "refused the handshake" in line
    assert "SESSIONS_SSL_CERTFILE" in line


def sasl_env(url: str, mechanism: str, root: Path) -> dict[str, str]:
    """Settings of a worker that logs in with SASL and a password the broker will refuse."""
    return {
        **os.environ,
        "SESSIONS_BROKER_URL": url,
        "SESSIONS_BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "SESSIONS_SASL_MECHANISM": mechanism,
        "SESSIONS_SASL_USERNAME": "sessions",
        "SESSIONS_SASL_PASSWORD": "not-the-password",
        "SESSIONS_DATA_DIR": str(root / "data"),
        "SESSIONS_WEB_PORT": str(free_port()),
    }


def test_a_refused_sasl_login_stops_the_worker_with_one_line_not_a_hang(tmp_path: Path) -> None:
    """SASL against the embedded broker's --authentication, as far as it goes here.

    tansu 0.6.0 offers SCRAM-SHA-256 and -512 (PLAIN: it hangs up), but keeps users in
    its storage, created through AlterUserScramCredentials, which it refuses before a
    client has authenticated: with memory storage no user can exist, so every login
    fails. That is the path tested: a refused login is one clear line and exit 2.
    """
    with EmbeddedBroker(authentication=True) as broker:
        env = sasl_env(broker.url, "SCRAM-SHA-256", tmp_path)
        result = run(env, "worker", "-l", "info", timeout=90)
    assert result.returncode == 2, result.stderr[-3000:]
    line = one_line(result, "sessions-app: the broker at")
    assert "did not accept SASL SCRAM-SHA-256 for user 'sessions'" in line
    assert "SESSIONS_SASL_PASSWORD" in line
    assert "not-the-password" not in result.stderr + result.stdout


def test_produce_worker_and_verify_through_mutual_tls(
    tls_broker: TLSBroker, tmp_path: Path
) -> None:
    env = deployment_env(tls_broker, "mtls", tmp_path)
    names = [env[f"SESSIONS_{n}_TOPIC"] for n in ("INPUT", "OUTPUT", "EXPIRED", "DLQ", "ALERTS")]
    create_topics_sync(
        tls_broker.url.removeprefix("kafka://"),
        names,
        2,
        security_protocol="SSL",
        ssl_context=_client_context(tls_broker.certificates),
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "sessions_app", "worker", "-l", "info"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        manifest = tmp_path / "manifest.jsonl"
        produced = run(
            env, "produce", "--sessions", "200", "--records", "5", "--manifest", str(manifest)
        )
        assert produced.returncode == 0, produced.stderr[-3000:]
        verified = run(env, "verify", "--manifest", str(manifest), "--timeout", "60")
        assert verified.returncode == 0, (
            verified.stdout + verified.stderr[-2000:] + log_path.read_text()[-3000:]
        )
        assert "missing:           0" in verified.stdout
        assert "received:          1000" in verified.stdout
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    # Nothing the worker logged shows a secret or the key's contents.
    assert "PRIVATE KEY" not in log_path.read_text()


def _client_context(certificates: Certificates):  # type: ignore[no-untyped-def]
    import ssl

    context = ssl.create_default_context(cafile=str(certificates.ca))
    context.load_cert_chain(str(certificates.client_cert), str(certificates.client_key))
    return context


def test_an_unreachable_broker_is_not_blamed_on_the_credentials(tmp_path: Path) -> None:
    nowhere = f"kafka://127.0.0.1:{free_port()}"  # nothing listens there
    result = run(sasl_env(nowhere, "PLAIN", tmp_path), "worker", "-l", "info", timeout=90)
    assert result.returncode == 1, result.stderr[-3000:]
    line = one_line(result, "sessions-app: cannot reach the broker at")
    assert "SASL" not in line
