"""The Kubernetes manifests: rendered by kustomize, validated offline.

Core kinds against kubernetes-validate's bundled schemas, custom resources
against the CRD schemas vendored in k8s/schemas/, and the cross-resource
contracts that no schema sees (selectors, ports, partitions vs replicas).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from daemon.config import ServiceSettings, Topics, load_thresholds

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
OVERLAYS = ("dev", "prod")
K8S_VERSION = "1.32"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor_v1.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule_v1.json",
    ("kafka.strimzi.io/v1", "KafkaTopic"): "kafkatopic_v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject_v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication_v1alpha1.json",
}
TOPICS = set(Topics().model_dump().values())


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(overlay: str) -> list[dict[str, Any]]:
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl (with its built-in kustomize) is installed")
    out = subprocess.run(
        [*cmd, str(K8S / "overlays" / overlay)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def strict(schema: Any) -> Any:
    """Close every object schema that lists its properties.

    The API server prunes (or, with strict field validation, rejects)
    unknown fields; plain JSON Schema would accept a misspelt key silently.
    """
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_validator(api_version: str, kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((K8S / "schemas" / CRD_SCHEMAS[(api_version, kind)]).read_text())
    schema.pop("$comment", None)
    schema.pop("x-kubernetes-group-version-kind", None)
    closed = strict(schema)
    # metadata is checked by the API server's ObjectMeta, not the CRD schema
    closed["properties"]["metadata"] = {"type": "object"}
    cls = jsonschema.validators.validator_for(closed, default=jsonschema.Draft7Validator)
    return cls(closed)


def validate(doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        errors = sorted(crd_validator(*key).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_resource_validates(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
        "KafkaTopic",
        "ScaledObject",
    } <= kinds
    for doc in docs:
        try:
            validate(doc)
        except Exception as e:  # name the resource that failed
            raise AssertionError(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {e}") from e
        assert doc["metadata"].get("namespace") == {"dev": "tapd-dev", "prod": "tapd"}[overlay]


def test_validators_reject_broken_resources(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    topic = copy.deepcopy(one(docs, "KafkaTopic", "tap-traces"))
    topic["spec"]["partitons"] = 3  # misspelt
    with pytest.raises(AssertionError, match="partitons"):
        validate(topic)
    scaled = copy.deepcopy(one(docs, "ScaledObject", "tapd-scorer"))
    del scaled["spec"]["scaleTargetRef"]
    with pytest.raises(AssertionError, match="scaleTargetRef"):
        validate(scaled)
    deployment = copy.deepcopy(one(docs, "Deployment", "tapd-scorer"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = [
        9400
    ]
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_scorer_pod_contract(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    dep = one(docs, "Deployment", "tapd-scorer")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["resources"]["requests"] and c["resources"]["limits"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    for path in ("/tmp", "/var/lib/tapd"):
        assert "emptyDir" in volumes[mounts[path]["name"]], path
    # Thresholds: a whole-directory ConfigMap mount, so kubelet's updates
    # reach the watched file; subPath mounts never update.
    th = mounts["/etc/tapd/thresholds"]
    assert "subPath" not in th and "subPathExpr" not in th
    assert volumes[th["name"]]["configMap"]["name"] == "tapd-thresholds"
    env = {e["name"]: e for e in c["env"]}
    assert env["TAPD_SERVICE__THRESHOLDS_FILE"]["value"] == "/etc/tapd/thresholds/thresholds.yaml"
    assert env["TAPD_SERVICE__ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tapd-secrets"
    cm = one(docs, "ConfigMap", "tapd-thresholds")  # no hash suffix: edits apply in place
    load_thresholds_text(cm["data"]["thresholds.yaml"])
    pdb = one(docs, "PodDisruptionBudget", "tapd-scorer")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(dep).items()
    svc = one(docs, "Service", "tapd-scorer")
    assert svc["spec"]["selector"].items() <= pod_labels(dep).items()


def load_thresholds_text(text: str) -> None:
    fd, name = tempfile.mkstemp(suffix=".yaml")
    os.close(fd)
    path = Path(name)
    try:
        path.write_text(text)
        load_thresholds(path)  # raises on any unknown or out-of-range threshold
    finally:
        path.unlink()


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def test_trainer_contract(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    sts = one(docs, "StatefulSet", "tapd-trainer")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    resources = c["resources"]
    assert "nvidia.com/gpu" not in resources.get("requests", {})
    gpus = resources.get("limits", {}).get("nvidia.com/gpu")
    env = {e["name"]: e.get("value") for e in c["env"]}
    if overlay == "prod":
        assert gpus == 1 and env["TAPD_POLICY__DEVICE"] == "cuda"
    else:
        assert gpus is None and env["TAPD_POLICY__DEVICE"] == "cpu"
    claims = {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/var/lib/tapd"} <= claims
    assert sts["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


def test_topics_and_autoscaling(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    topics = {d["spec"]["topicName"]: d for d in docs if d["kind"] == "KafkaTopic"}
    assert set(topics) == TOPICS
    for t in topics.values():
        assert t["metadata"]["labels"]["strimzi.io/cluster"] == "tapd-kafka"
        assert t["spec"]["partitions"] >= 1
        assert "retention.ms" in t["spec"]["config"]
    # The state a scorer replica rebuilds from: compacted, kept forever; the
    # label, policy and label-output topics in one order for every replica;
    # the changelog with a partition per traces partition.
    for name in ("tap.labels", "tap.lift", "tap.policies", "tap.scorer-state"):
        config = topics[name]["spec"]["config"]
        assert config["cleanup.policy"] == "compact" and config["retention.ms"] == -1, name
    for name in ("tap.lift", "tap.policies", "tap.labels"):
        assert topics[name]["spec"]["partitions"] == 1, name
    traces_partitions = topics["tap.traces"]["spec"]["partitions"]
    assert topics["tap.scorer-state"]["spec"]["partitions"] == traces_partitions
    so = one(docs, "ScaledObject", "tapd-scorer")
    (trigger,) = so["spec"]["triggers"]
    assert trigger["type"] == "kafka"
    # KEDA reads the lag of the group the scorers join.
    assert trigger["metadata"]["consumerGroup"] == ServiceSettings().group
    assert trigger["metadata"]["topic"] == "tap.traces"
    assert so["spec"]["maxReplicaCount"] <= topics["tap.traces"]["spec"]["partitions"]
    assert so["spec"]["scaleTargetRef"]["name"] == "tapd-scorer"
    ref = trigger.get("authenticationRef")
    if ref:
        one(docs, "TriggerAuthentication", ref["name"])


def test_monitoring_is_selected(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, docs = rendered
    prom = yaml.safe_load((K8S / "monitoring" / "prometheus.yaml").read_text())["spec"]
    sm = one(docs, "ServiceMonitor", "tapd")
    rule = one(docs, "PrometheusRule", "tapd")
    ns = {"dev": "tapd-dev", "prod": "tapd"}[overlay]
    assert prom["serviceMonitorSelector"]["matchLabels"].items() <= sm["metadata"]["labels"].items()
    assert prom["ruleSelector"]["matchLabels"].items() <= rule["metadata"]["labels"].items()
    for sel in (prom["serviceMonitorNamespaceSelector"], prom["ruleNamespaceSelector"]):
        assert ns in sel["matchExpressions"][0]["values"]
    # Each tapd Service is selected and exposes a port an endpoint scrapes;
    # jobLabel gives the job names the alert rules use.
    ports = {e["port"] for e in sm["spec"]["endpoints"]}
    (expr,) = sm["spec"]["selector"]["matchExpressions"]
    for name in ("tapd-scorer", "tapd-trainer"):
        svc = one(docs, "Service", name)
        assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == name
        assert svc["metadata"]["labels"][expr["key"]] in expr["values"]
        assert ports & {p["name"] for p in svc["spec"]["ports"]}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    assert rule["spec"]["groups"] == rules["groups"]


def test_prometheusrule_is_generated_from_rules_yml() -> None:
    out = subprocess.run(
        [sys.executable, str(K8S / "render_prometheusrule.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_thresholds_files_agree() -> None:
    base = (K8S / "base" / "thresholds.yaml").read_text()
    local = (ROOT / "deploy" / "thresholds" / "thresholds.yaml").read_text()
    assert yaml.safe_load(base) == yaml.safe_load(local)
    load_thresholds(K8S / "base" / "thresholds.yaml")


def test_network_policies_cover_both_roles(rendered: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = rendered
    for name, port in (("tapd-scorer", "http"), ("tapd-trainer", "metrics")):
        np = one(docs, "NetworkPolicy", name)
        workload = one(docs, "Deployment" if name == "tapd-scorer" else "StatefulSet", name)
        assert np["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(workload).items()
        assert set(np["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        assert [p["port"] for rule in np["spec"]["ingress"] for p in rule["ports"]] == [port]


def test_kubernetes_validate_cli_strict_on_every_overlay(tmp_path: Path) -> None:
    """The command a platform team's CI runs, on the kustomize output of each
    overlay: core kinds pass strict validation, and the only resources it has
    no schema for are the custom resources validated above (CRD_SCHEMAS)."""
    tool = shutil.which("kubernetes-validate") or shutil.which(
        "kubernetes-validate", path=str(Path(sys.executable).parent)
    )
    assert tool is not None, "kubernetes-validate is a dev dependency"
    for overlay in OVERLAYS:
        rendered = tmp_path / f"{overlay}.yaml"
        rendered.write_text(yaml.safe_dump_all(render(overlay)))
        out = subprocess.run(
            [tool, "--strict", "-k", K8S_VERSION, str(rendered)], capture_output=True, text=True
        )
        assert out.returncode == 0, out.stdout + out.stderr
        text = out.stdout + out.stderr
        passed = text.count(" passed for resource ")
        core = [d for d in render(overlay) if (d["apiVersion"], d["kind"]) not in CRD_SCHEMAS]
        assert passed == len(core) > 0
        missing = {
            line.split("kind ")[1].split(" with api version ")[0]
            for line in text.splitlines()
            if "Couldn't find schema" in line
        }
        assert missing <= {kind for _, kind in CRD_SCHEMAS}


def test_policy_versions_reach_every_pod_at_the_announced_path(
    rendered: tuple[str, list[dict[str, Any]]],
) -> None:
    """The trainer writes kept versions to TAPD_POLICY__STORE_PATH and announces
    their file:// URIs; every scorer pod must see the same files at the same path."""
    _, docs = rendered
    env = one(
        docs,
        "ConfigMap",
        next(
            d["metadata"]["name"]
            for d in docs
            if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("tapd-env")
        ),
    )["data"]
    store = env["TAPD_POLICY__STORE_PATH"]
    pvc = one(docs, "PersistentVolumeClaim", "tapd-policies")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for kind, name, writable in (
        ("StatefulSet", "tapd-trainer", True),
        ("Deployment", "tapd-scorer", False),
    ):
        pod = one(docs, kind, name)["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == store]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]
        assert claim["claimName"] == "tapd-policies"
        assert bool(mount.get("readOnly")) is not writable, name
