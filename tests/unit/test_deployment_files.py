"""docker/'s Compose and Kubernetes files, checked without a container engine.

No Docker engine or cluster runs on the development machines, so these files
are read as YAML and held to the invariants a deployment depends on.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

import sessions_app.settings
from sessions_app.web.views import blueprint

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
KUBERNETES = DOCKER / "kubernetes"
WORKER_COMMAND = ["sessions-app", "worker", "-l", "info"]


def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())  # type: ignore[no-any-return]


def manifests() -> list[dict[str, Any]]:
    """Every Kubernetes object kustomization.yaml lists, with List items flattened."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    objects: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        for document in yaml.safe_load_all((KUBERNETES / name).read_text()):
            objects += document["items"] if document["kind"] == "List" else [document]
    return objects


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [o for o in manifests() if o["kind"] == kind]


def real_settings() -> set[str]:
    source = Path(sessions_app.settings.__file__).read_text()
    names = re.findall(r'(?:get\(\s*|PREFIX \+ )"([A-Z_]+)"', source)
    return {"SESSIONS_" + name for name in names}


def routes() -> set[str]:
    return {route.uri for route in blueprint.routes}


def default(value: str) -> str:
    """Return the value Compose gives `${VAR:-default}` when VAR is unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_the_settings_are_read_from_the_source() -> None:
    found = real_settings()
    assert {"SESSIONS_BROKER_URL", "SESSIONS_PARTITIONS", "SESSIONS_WEB_TOKEN"} <= found
    assert len(found) >= 25


def test_compose_declares_every_named_volume_it_mounts() -> None:
    spec = compose()
    declared = set(spec["volumes"])
    used = set()
    for service in spec["services"].values():
        for mount in service.get("volumes", []):
            source = mount.split(":", 1)[0]
            if not source.startswith((".", "/")):
                used.add(source)
    assert used == declared
    # Kafka's log directory is on its volume: topics and offsets survive `down` and `up`.
    kafka = spec["services"]["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert any(mount.endswith(":" + log_dirs) for mount in kafka["volumes"])


def test_compose_takes_the_partition_count_from_one_variable() -> None:
    spec = compose()
    services = spec["services"]
    workers = [s for s in services.values() if s.get("image") == "sessions-app:local"]
    assert len(workers) >= 3
    counts = {service["environment"]["SESSIONS_PARTITIONS"] for service in workers}
    counts.add(services["topics"]["environment"]["PARTITIONS"])
    assert counts == {"${SESSIONS_PARTITIONS:-8}"}
    assert '--partitions "$$PARTITIONS"' in services["topics"]["command"][0]
    assert "set -eu" in services["topics"]["command"][0]


def test_compose_workers_are_distinct_and_restartable() -> None:
    services = compose()["services"]
    workers = {name: s for name, s in services.items() if name.startswith("worker-")}
    assert len({s["hostname"] for s in workers.values()}) == len(workers)
    assert sum("build" in s for s in services.values()) == 1  # one image for all
    for service in workers.values():
        assert service["restart"] == "unless-stopped"
        assert service["init"] is True
        assert "command" not in service  # the image's CMD: the worker README shows
    assert services["produce"]["healthcheck"] == {"disable": True}


def test_every_sessions_variable_is_a_real_setting() -> None:
    known = real_settings()
    used: set[str] = set()
    for service in compose()["services"].values():
        used |= {k for k in service.get("environment", {}) if k.startswith("SESSIONS_")}
    for config_map in of_kind("ConfigMap") + of_kind("Secret"):
        data = config_map.get("data") or config_map.get("stringData") or {}
        used |= {k for k in data if k.startswith("SESSIONS_")}
    dockerfile = (DOCKER / "Dockerfile").read_text()
    used |= set(re.findall(r"\b(SESSIONS_[A-Z_]+)=", dockerfile))
    assert used, "no setting found: the files' layout changed"
    assert used <= known, used - known


def test_kubernetes_topics_and_settings_agree_on_the_partition_count() -> None:
    (config,) = of_kind("ConfigMap")
    partitions = int(config["data"]["SESSIONS_PARTITIONS"])
    topics = of_kind("KafkaTopic")
    names = {t["spec"].get("topicName", t["metadata"]["name"]) for t in topics}
    app_id = config["data"]["SESSIONS_APP_ID"]
    assert {
        "sessions-chunks",
        "sessions-records",
        "sessions-expired",
        f"{app_id}-session_buffers-changelog",
    } <= names
    assert {t["spec"]["partitions"] for t in topics} == {partitions}
    # Compose's default agrees, so the two examples describe one deployment.
    compose_default = default(compose()["services"]["topics"]["environment"]["PARTITIONS"])
    assert int(compose_default) == partitions


def test_kubernetes_probes_and_command_point_at_what_the_worker_serves() -> None:
    (statefulset,) = of_kind("StatefulSet")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == WORKER_COMMAND
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["web"]
    (config,) = of_kind("ConfigMap")
    assert int(config["data"]["SESSIONS_WEB_PORT"]) == port
    paths = {
        container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {"/livez", "/readyz"}
    assert paths <= routes()
    assert pod["securityContext"]["runAsUser"] == 10001
    assert pod["terminationGracePeriodSeconds"] >= 30
    claims = {c["metadata"]["name"] for c in statefulset["spec"]["volumeClaimTemplates"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert set(mounts) <= claims
    assert mounts["data"] == config["data"]["SESSIONS_DATA_DIR"]
    (budget,) = of_kind("PodDisruptionBudget")
    assert budget["spec"]["selector"] == statefulset["spec"]["selector"]


def test_the_image_runs_the_worker_readme_shows_as_a_numeric_user() -> None:
    dockerfile = (DOCKER / "Dockerfile").read_text()
    cmd = re.search(r"^CMD (.+)$", dockerfile, re.M)
    assert cmd is not None
    assert yaml.safe_load(cmd.group(1)) == WORKER_COMMAND
    assert re.search(r"^USER \d+$", dockerfile, re.M)
    health = re.search(r"/livez", dockerfile)
    assert health is not None and "/livez" in routes()
    assert "SESSIONS_WEB_PORT" in dockerfile.split("HEALTHCHECK", 1)[1]
    readme = (ROOT / "README.md").read_text()
    assert shlex.join(WORKER_COMMAND) in readme


def test_the_secured_compose_variant_mounts_every_file_its_settings_name() -> None:
    secured = yaml.safe_load((DOCKER / "compose.secured.yaml").read_text())
    declared = set(secured["secrets"])
    known = real_settings()
    base = compose()["services"]
    for name, service in secured["services"].items():
        assert name in base or name == "users", f"{name} overrides no service of compose.yaml"
        mounted = set(service.get("secrets", []))
        assert mounted <= declared
        environment = service.get("environment", {})
        assert {k for k in environment if k.startswith("SESSIONS_")} <= known
        for key, value in environment.items():
            if key.startswith("SESSIONS_") and str(value).startswith("/run/secrets/"):
                assert value.removeprefix("/run/secrets/") in mounted, (name, key)
    for name in ("worker-1", "worker-2", "produce"):
        environment = secured["services"][name]["environment"]
        assert environment["SESSIONS_BROKER_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert "SESSIONS_SASL_PASSWORD" not in environment  # from a file, never inline
        assert "SESSIONS_SASL_PASSWORD_FILE" in environment
    kafka = secured["services"]["kafka"]["environment"]
    assert "SASL_SSL://:9094" in kafka["KAFKA_LISTENERS"]
    # What the apache/kafka image's start script requires once a listener is SSL or SASL:
    # the keystore and its password files under /etc/kafka/secrets, a JAAS file in KAFKA_OPTS.
    for required in (
        "KAFKA_SSL_KEYSTORE_FILENAME",
        "KAFKA_SSL_KEYSTORE_CREDENTIALS",
        "KAFKA_SSL_KEY_CREDENTIALS",
    ):
        assert kafka[required]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in secured["services"]["kafka"]["volumes"]}
    assert "/etc/kafka/secrets" in mounts
    jaas = kafka["KAFKA_OPTS"].split("java.security.auth.login.config=", 1)[1]
    assert (DOCKER / mounts[jaas]).is_file()  # the JAAS file is in the repository
    assert (
        kafka["KAFKA_SASL_ENABLED_MECHANISMS"]
        == (secured["services"]["worker-1"]["environment"]["SESSIONS_SASL_MECHANISM"])
    )
