"""TLS and SASL settings: validated at start, one line naming the variable, secrets never shown."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest

from sessions_app.settings import Settings, SettingsError

SECRET = "hunter2-is-not-a-password"


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A self-signed certificate with its key, an encrypted copy of the key, and a stray file."""
    root = tmp_path_factory.mktemp("pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", "key.pem", "-out", "cert.pem", "-subj", "/CN=sessions-test"],
        cwd=root, check=True, capture_output=True,
    )  # fmt: skip
    subprocess.run(
        ["openssl", "pkey", "-in", "key.pem", "-aes256", "-passout", f"pass:{SECRET}",
         "-out", "key-encrypted.pem"],
        cwd=root, check=True, capture_output=True,
    )  # fmt: skip
    (root / "not-pem.txt").write_text("not a certificate\n")
    (root / "password").write_text(SECRET + "\n")
    return {p.stem: p for p in root.iterdir()}


def bad(env: dict[str, str]) -> SettingsError:
    with pytest.raises(SettingsError) as err:
        Settings.from_env(env)
    message = str(err.value)
    assert "\n" not in message
    assert SECRET not in message
    return err.value


def test_plaintext_is_the_default_and_gives_plain_client_options() -> None:
    # Another program's variables of the same shape are none of ours.
    settings = Settings.from_env({"SSL_CERT_FILE": "/etc/ssl/x.pem", "SASL_USER": "u"})
    assert settings.broker_security_protocol == "PLAINTEXT"
    assert settings.kafka_client_options() == {
        "bootstrap_servers": ["127.0.0.1:9092"],
        "security_protocol": "PLAINTEXT",
    }


def test_mutual_tls_builds_a_context_with_the_client_certificate(pem: dict[str, Path]) -> None:
    settings = Settings.from_env(
        {
            "SESSIONS_BROKER_SECURITY_PROTOCOL": "SSL",
            "SESSIONS_SSL_CAFILE": str(pem["cert"]),
            "SESSIONS_SSL_CERTFILE": str(pem["cert"]),
            "SESSIONS_SSL_KEYFILE": str(pem["key-encrypted"]),
            "SESSIONS_SSL_KEY_PASSWORD": SECRET,
        }
    )
    options = settings.kafka_client_options()
    assert options["security_protocol"] == "SSL"
    context = options["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert SECRET not in repr(settings)


def test_sasl_over_tls_with_the_password_from_a_file(pem: dict[str, Path]) -> None:
    settings = Settings.from_env(
        {
            "SESSIONS_BROKER_SECURITY_PROTOCOL": "SASL_SSL",
            "SESSIONS_SSL_CAFILE": str(pem["cert"]),
            "SESSIONS_SSL_CHECK_HOSTNAME": "false",
            "SESSIONS_SASL_MECHANISM": "SCRAM-SHA-512",
            "SESSIONS_SASL_USERNAME": "sessions",
            "SESSIONS_SASL_PASSWORD_FILE": str(pem["password"]),
        }
    )
    options = settings.kafka_client_options()
    assert (options["sasl_mechanism"], options["sasl_plain_username"]) == (
        "SCRAM-SHA-512",
        "sessions",
    )
    assert options["sasl_plain_password"] == SECRET  # the file's trailing newline is not in it
    assert options["ssl_context"].check_hostname is False
    assert SECRET not in repr(settings)


@pytest.mark.parametrize(
    ("env", "variable", "says"),
    [
        ({"SESSIONS_BROKER_SECURITY_PROTOCOL": "TLS"}, "BROKER_SECURITY_PROTOCOL", "one of"),
        (
            {"SESSIONS_BROKER_SECURITY_PROTOCOL": "SSL", "SESSIONS_SSL_CAFILE": "/no/such.pem"},
            "SSL_CAFILE",
            "readable file",
        ),
        ({"SESSIONS_SSL_CAFILE": "{cert}"}, "SSL_CAFILE", "PLAINTEXT does not use TLS"),
        (
            {"SESSIONS_BROKER_SECURITY_PROTOCOL": "SSL", "SESSIONS_SSL_CERTFILE": "{cert}"},
            "SSL_KEYFILE",
            "mutual TLS takes both",
        ),
        (
            {"SESSIONS_BROKER_SECURITY_PROTOCOL": "SSL", "SESSIONS_SSL_CAFILE": "{not-pem}"},
            "SSL_CAFILE",
            "no usable CA",
        ),
        (
            {
                "SESSIONS_BROKER_SECURITY_PROTOCOL": "SSL",
                "SESSIONS_SSL_CERTFILE": "{cert}",
                "SESSIONS_SSL_KEYFILE": "{key-encrypted}",
                "SESSIONS_SSL_KEY_PASSWORD": "wrong-password",
            },
            "SSL_CERTFILE",
            "SESSIONS_SSL_KEY_PASSWORD",
        ),
        (
            {"SESSIONS_BROKER_SECURITY_PROTOCOL": "SSL", "SESSIONS_SSL_CHECK_HOSTNAME": "maybe"},
            "SSL_CHECK_HOSTNAME",
            "true or false",
        ),
        (
            {"SESSIONS_BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "SESSIONS_SASL_USERNAME": "u"},
            "SASL_MECHANISM",
            "must be set with",
        ),
        (
            {
                "SESSIONS_BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                "SESSIONS_SASL_MECHANISM": "PLAIN",
                "SESSIONS_SASL_USERNAME": "u",
            },
            "SASL_PASSWORD",
            "SESSIONS_SASL_PASSWORD_FILE",
        ),
        (
            {"SESSIONS_BROKER_SECURITY_PROTOCOL": "SASL_SSL", "SESSIONS_SASL_MECHANISM": "GSSAPI"},
            "SASL_MECHANISM",
            "PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
        ),
        ({"SESSIONS_SASL_PASSWORD": SECRET}, "SASL_PASSWORD", "does not use SASL"),
        ({"SESSIONS_SASL_PASSWORD_FILE": "{password}"}, "SASL_PASSWORD_FILE", "does not use SASL"),
        (
            {"SESSIONS_BROKER_SECURITY_PROTOCOL": "SSL", "SESSIONS_SSL_KEY_PASSWORD": SECRET},
            "SSL_KEY_PASSWORD",
            "only with SESSIONS_SSL_KEYFILE",
        ),
        (
            {"SESSIONS_SASL_PASSWORD": SECRET, "SESSIONS_SASL_PASSWORD_FILE": "{password}"},
            "SASL_PASSWORD_FILE",
            "not be set with",
        ),
    ],
)
def test_a_bad_security_setting_names_its_variable_and_hides_secrets(
    pem: dict[str, Path], env: dict[str, str], variable: str, says: str
) -> None:
    filled = {
        key: value.format(**{name: str(path) for name, path in pem.items()})
        for key, value in env.items()
    }
    error = bad(filled)
    assert error.variable == "SESSIONS_" + variable
    assert str(error).startswith("SESSIONS_" + variable)
    assert says in str(error)
