"""docs/RUNBOOK.md works as written.

Every ``sh`` block runs, verbatim, with bash (``-euo pipefail``) against a live
``tapd run`` on the embedded log, in the scorer's environment (as ``kubectl
exec`` would give), with traffic in flight, dead letters and two predictor
snapshots to roll back between; each must exit 0 without a traceback.
``sh-k8s`` blocks need a cluster: every object they name must exist in the
rendered production overlay.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab.reliability import ServiceProcess, _wait_ready, free_port, tapd_argv

ROOT = Path(__file__).resolve().parents[2]
RUNBOOK = ROOT / "docs" / "RUNBOOK.md"


def blocks(lang: str) -> list[str]:
    text = RUNBOOK.read_text()
    return [
        m.group(1) for m in re.finditer(rf"^```{re.escape(lang)}\n(.*?)^```\s*$", text, re.M | re.S)
    ]


def test_the_runbook_has_commands_for_every_alert() -> None:
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules.yml").read_text())
    alerts = [r["alert"] for g in rules["groups"] for r in g["rules"]]
    text = RUNBOOK.read_text()
    for alert in alerts:
        section = text.split(f"## {alert}\n", 1)[1].split("\n## ", 1)[0]
        assert "```sh" in section, f"{alert}: no command to run"
    # No unrunnable leftovers: the old kcat lines, the old env-only token.
    assert "kcat" not in text and "-o jsonpath" not in text
    assert len(blocks("sh")) >= 20


@pytest.fixture(scope="module")
def scorer(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[dict[str, str], ServiceProcess, str, Path]]:
    from daemon.config import PredictorSettings
    from daemon.core.predictor import Predictor
    from daemon.runtime.modelstore import ModelStore

    tmp = tmp_path_factory.mktemp("runbook")
    port = free_port()
    thresholds = tmp / "thresholds" / "thresholds.yaml"
    thresholds.parent.mkdir()
    shutil.copy(ROOT / "deploy" / "thresholds" / "thresholds.yaml", thresholds)
    env = {
        "TAPD_STATE_DIR": str(tmp / "state"),
        "TAPD_TRANSPORT__KIND": "embedded",
        "TAPD_TRANSPORT__EMBEDDED_PATH": str(tmp / "log.sqlite"),
        "TAPD_SERVICE__PORT": str(port),
        "TAPD_SERVICE__POLL_TIMEOUT_S": "0.2",
        "TAPD_SERVICE__THRESHOLDS_FILE": str(thresholds),
        "TAPD_COHORTING__MAX_GROUPS": "4",
        "TAPD_COHORTING__MAX_AGE_S": "3600",
        "TAPD_THRESHOLDS__EXPLORATION_SHARE": "1.0",
    }
    store = ModelStore(tmp / "state" / "models")
    p = Predictor(PredictorSettings())
    for version in (1, 2):
        p.version = version
        store.save(p.snapshot(created_ts=1_000.0 + version))
    proc = ServiceProcess(tapd_argv("run"), env, tmp / "scorer.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, timeout_s=180)
        # The same shim an image's `tapd` is: this checkout's code.
        bin_dir = tmp / "bin"
        bin_dir.mkdir()
        shim = bin_dir / "tapd"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m daemon.cli "$@"\n')
        shim.chmod(0o755)
        run_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TAPD_")},
            **env,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT),
        }
        # Traffic: 16 synthetic traces (4 cohorts; the in-flight cap takes
        # some), and three traces a producer got wrong (dead letters, decode).
        subprocess.run(
            ["tapd", "generate", "--n", "16", "--topic", "tap.traces"],
            env=run_env, cwd=tmp, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        bad = tmp / "bad.jsonl"
        bad.write_text('{"schema": "tapd.trace/1", "trace_id": "no-prompt"}\n{oops\n[1, 2]\n')
        subprocess.run(
            ["tapd", "produce", str(bad), "-t", "tap.traces", "--no-validate"],
            env=run_env, cwd=tmp, check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while True:
            st = subprocess.run(
                ["tapd", "cohorts", "--in-flight", "--ids"],
                env=run_env, cwd=tmp, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            letters = subprocess.run(
                ["tapd", "dlq", "list", "--stage", "decode", "--ids"],
                env=run_env, cwd=tmp, capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if st.stdout.strip() and len(letters.stdout.split()) >= 3:
                break
            assert proc.alive(), proc.logs()[-3000:]
            assert time.monotonic() < deadline, proc.logs()[-3000:]
            time.sleep(1.0)
        yield run_env, proc, url, tmp
    finally:
        proc.kill()


def test_every_sh_block_runs(scorer: tuple[dict[str, str], ServiceProcess, str, Path]) -> None:
    env, proc, url, tmp = scorer
    ran = 0
    for i, block in enumerate(blocks("sh")):
        out = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=300,
        )
        where = f"block {i}:\n{block}\nstdout: {out.stdout[-1500:]}\nstderr: {out.stderr[-1500:]}"
        assert out.returncode == 0, where
        assert "Traceback" not in out.stderr, where
        ran += 1
        # A model rollback restarts the scorer: wait for it before the next block.
        _wait_ready(url, proc, timeout_s=240)
    assert ran == len(blocks("sh"))
    # What the blocks did is visible: the rollback happened, the drill's
    # override came and went, and overrides set by later sections are in force.
    assert proc.events("model_rolled_back")
    assert any(
        e.get("why") == "runbook drill: stop dispatching" for e in proc.events("thresholds_changed")
    )


def test_every_k8s_block_names_objects_that_exist() -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl missing (needed to render the overlay)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / "prod")],
        capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    objects = {
        (d["kind"].lower(), d["metadata"]["name"], d["metadata"].get("namespace"))
        for d in yaml.safe_load_all(rendered)
        if d
    }
    aliases = {"deploy": "deployment", "statefulset": "statefulset", "configmap": "configmap",
               "scaledobject": "scaledobject", "kafkatopic": "kafkatopic"}  # fmt: skip
    checked = 0
    for block in blocks("sh-k8s"):
        for line in block.strip().splitlines():
            words = line.split()
            assert words[:3] == ["kubectl", "-n", "tapd"], line
            verb, rest = words[3], words[4:]
            if "--" in rest:  # what follows runs inside the container
                rest = rest[: rest.index("--")]
            label = rest[rest.index("-l") + 1] if "-l" in rest else None
            targets = [w for w in rest if "/" in w and not w.startswith("-") and w != label]
            if not targets and rest and not rest[0].startswith("-") and rest[0] != "pods":
                targets = [f"{rest[0]}/{rest[1]}"] if len(rest) > 1 else []
            for t in targets:
                kind, name = t.split("/", 1)
                if kind == "pod":  # a StatefulSet's pod: <name>-<ordinal>
                    kind, name = "statefulset", name.rsplit("-", 1)[0]
                assert (aliases.get(kind, kind), name, "tapd") in objects, (verb, t)
                checked += 1
            if label is not None:
                assert f"{label.replace('=', ': ')}" in rendered, line
                checked += 1
    assert checked >= 8
