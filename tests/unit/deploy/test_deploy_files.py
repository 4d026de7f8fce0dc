"""deploy/ validated offline: compose against the compose spec, manifests against Kubernetes'
schemas (KEDA's CRDs against a vendored schema), alert rules' shape and metric names, and a
Dockerfile lint. No container engine runs here, so these are the checks CI can make."""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import fakeredis
import jsonschema
import kubernetes_validate
import pytest
import yaml

from worker.ops import gauges
from worker.telemetry import metrics

ROOT = Path(__file__).resolve().parents[3]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.30.0"
KEDA_SCHEMA = Path(__file__).with_name("keda-v1alpha1.schema.json")


class _ComposeLoader(yaml.SafeLoader):  # type: ignore[misc]
    """Compose's own YAML tags: ``!reset`` / ``!override`` (the value is what we check)."""


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else loader.construct_mapping(node)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_scalar(node)
        ),
    )


def _compose_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads(vendored.joinpath("compose-spec.json").read_text())
    return schema


def _load_compose(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.load((DEPLOY / name).read_text(), Loader=_ComposeLoader)
    return loaded


@pytest.mark.parametrize("name", ["compose.yaml", "compose.sandbox.yaml", "compose.sentinel.yaml"])
def test_compose_files_follow_the_compose_spec(name: str) -> None:
    schema = _compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [
        f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(_load_compose(name))
    ]
    assert errors == []


def test_compose_runs_the_pool_as_the_issue_asks() -> None:
    services = _load_compose("compose.yaml")["services"]
    redis_cmd = services["redis"]["command"]
    assert "--appendonly" in redis_cmd and redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert services["webhook"]["command"][0] == "webhook"  # gunicorn, via apsis-export webhook
    # --scale worker=N: no fixed container name or published host port on the worker.
    assert "container_name" not in services["worker"] and "ports" not in services["worker"]
    assert services["worker"]["healthcheck"]["test"] == ["CMD", "apsis-export", "health"]
    assert services["storage-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    sandbox = _load_compose("compose.sandbox.yaml")["services"]
    assert sandbox["worker"]["environment"]["APSIS_BASE_URL"].startswith("http://127.0.0.1")


def test_the_sentinel_variant_points_every_process_at_three_sentinels() -> None:
    services = _load_compose("compose.sentinel.yaml")["services"]
    sentinels = [name for name in services if name.startswith("sentinel-")]
    assert len(sentinels) == 3
    for name in sentinels:
        command = " ".join(services[name]["command"])
        assert "sentinel monitor apsis redis 6379 2" in command and "--sentinel" in command
    replica = services["redis-replica"]["command"]
    assert replica[replica.index("--replicaof") + 1 : replica.index("--replicaof") + 3] == [
        "redis",
        "6379",
    ]
    for role in ("webhook", "worker"):
        env = services[role]["environment"]
        assert env["REDIS_SENTINELS"] == ",".join(f"{n}:26379" for n in sentinels)
        assert env["REDIS_SENTINEL_MASTER"] == "apsis" and env["REDIS_MIN_REPLICAS_ACK"] == "1"


def _k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


def test_every_kubernetes_manifest_passes_strict_schema_validation() -> None:
    keda = json.loads(KEDA_SCHEMA.read_text())
    kinds = set()
    for _name, doc in _k8s_documents():
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            jsonschema.validate(doc, keda)  # a CRD: kubernetes-validate has no schema for it
        else:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    expected = {"Deployment", "Service", "Ingress", "PodDisruptionBudget", "ScaledObject"}
    assert expected | {"Secret", "NetworkPolicy", "ConfigMap"} <= kinds


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in _k8s_documents() if doc["kind"] == kind]


def test_probes_resources_and_secrets_are_set_as_operators_expect() -> None:
    deployments = {d["metadata"]["name"]: d for d in _by_kind("Deployment")}
    worker = deployments["apsis-export-worker"]["spec"]["template"]["spec"]["containers"][0]
    webhook = deployments["apsis-export-webhook"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["livenessProbe"]["exec"]["command"] == ["apsis-export", "health"]
    assert webhook["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert webhook["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for container in (worker, webhook):
        assert container["resources"]["requests"] and container["resources"]["limits"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for secret in _by_kind("Secret"):
        for key, value in secret["stringData"].items():
            assert "REPLACE_ME" in value or key in ("REDIS_URL", "REDIS_PASSWORD"), key
    scaled = _by_kind("ScaledObject")[0]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "apsis-export-worker"
    assert scaled["spec"]["triggers"][0]["metadata"]["listName"] == "apsis"  # the Celery queue


def test_the_worker_network_policy_allows_only_apsis_redis_storage_and_dns() -> None:
    (policy,) = _by_kind("NetworkPolicy")
    assert "Egress" in policy["spec"]["policyTypes"]
    ports = sorted({p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]})
    assert ports == [53, 443, 6379, 9000]


def _pool_metric_names() -> set[str]:
    """Every metric name the code exposes: counters, histograms and the scraped gauges."""
    fake = fakeredis.FakeRedis()
    families = list(metrics.metrics().registry.collect())
    families += list(gauges.PoolCollector(fake).collect())
    return {family.name for family in families}


def test_alert_rules_are_well_formed_and_use_only_metrics_that_exist() -> None:
    rules_file = yaml.safe_load((DEPLOY / "alerts.yaml").read_text())
    known = _pool_metric_names()
    alerts = []
    for group in rules_file["groups"]:
        assert set(group) <= {"name", "rules", "interval"} and group["name"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule
            assert isinstance(rule["alert"], str) and re.fullmatch(r"[A-Za-z]\w*", rule["alert"])
            assert re.fullmatch(r"\d+[smh]", rule["for"])
            assert rule["labels"]["severity"] in ("page", "ticket")
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
            assert rule["expr"].count("(") == rule["expr"].count(")")
            for used in re.findall(r"apsis_export_[a-z_]+", rule["expr"]):
                base = re.sub(r"_(total|count|sum|bucket)$", "", used)
                assert base in known, f"{rule['alert']}: {used} is not a metric the code exposes"
            alerts.append(rule["alert"])
    assert len(alerts) == len(set(alerts))
    for needed in ("NearGdprDeadline", "CallbacksNotArriving", "RateLimited", "InboxBacklog"):
        assert any(needed in a for a in alerts)
    assert any("Failures" in a for a in alerts)


def test_the_dockerfile_is_slim_non_root_and_documents_its_probes() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    instructions = [
        line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
    ]
    froms = [line for line in instructions if line.startswith("FROM ")]
    assert froms and all("python:3.11-slim" in line for line in froms)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert not any(re.match(r"ADD\s+https?://", line) for line in instructions)
    assert not re.search(r"apt-get install[^\n]*(gcc|build-essential|make)", text)
    assert 'ENTRYPOINT ["apsis-export"]' in instructions
    assert "HEALTHCHECK" in text or "apsis-export health" in text
