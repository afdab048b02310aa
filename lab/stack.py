"""``make stack``: the whole tapd stack in containers, once, end to end.

Brings up deploy/compose.offline.yaml with podman-compose (tansu broker,
scorer, CPU trainer, Prometheus; images from ``scripts/images.sh``), sends
traces through the scorer container's ``tapd produce``, waits until the
scorer has learned its first lift label and Prometheus has scraped it, then
tears the stack down (volumes too). Prints one JSON line of timings, the
figures docs/DEPLOY.md quotes.

    python -m lab.stack            # needs root, podman, podman-compose, runc
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab import tasks
from streams.schemas import Attempt, encode

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "deploy" / "compose.offline.yaml"
PROJECT = "tapd-offline"
SCORER = "http://127.0.0.1:9400"
PROMETHEUS = "http://127.0.0.1:9090"


def traces() -> list[bytes]:
    """Frontier slices, one attempt per trace (the scorer samples the rest)."""
    out = []
    for c, (subject, difficulty) in enumerate(
        [("add", "2d_carry"), ("sub", "2d_borrow"), ("mul", "2x1")]
    ):
        for i, task in enumerate(tasks.make_tasks(subject, difficulty, 4, seed=80 + c)):
            attempt = Attempt(completion=task.reference, reward=1.0, n_tokens=3)
            tr = tasks.to_trace(task, policy_version="v0", attempts=[attempt], key=f"stack{c}-{i}")
            out.append(encode(tr))
    return out


def metrics(url: str) -> dict[str, float]:
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=3) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def prometheus_value(query: str) -> float | None:
    q = urllib.parse.quote(query)
    try:
        with urllib.request.urlopen(f"{PROMETHEUS}/api/v1/query?query={q}", timeout=3) as r:
            body = json.load(r)
    except OSError:
        return None
    result = body.get("data", {}).get("result", [])
    return float(result[0]["value"][1]) if result else None


def wait(what: str, ready: Callable[[], bool], timeout_s: float, logs: Callable[[], str]) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if ready():
            return time.monotonic() - t0
        time.sleep(2.0)
    raise SystemExit(f"stack: {what} not within {timeout_s:.0f}s\n{logs()}")


def main() -> None:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(REPO / ".cache" / "images" / "containers.conf"))
    compose = [sys.executable, "-m", "podman_compose", "-p", PROJECT, "-f", str(COMPOSE)]

    def run(*args: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(list(args), env=env, check=True, **kw)

    def container(service: str) -> str:
        out = subprocess.run(
            [
                "podman",
                "ps",
                "-q",
                "--filter",
                f"label=io.podman.compose.project={PROJECT}",
                "--filter",
                f"label=com.docker.compose.service={service}",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return out[0] if out else ""

    def logs() -> str:
        parts = []
        for svc in ("broker", "scorer", "trainer", "prometheus"):
            cid = container(svc)
            if cid:
                res = subprocess.run(
                    ["podman", "logs", "--tail", "25", cid], env=env, capture_output=True, text=True
                )
                parts.append(f"--- {svc}\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
        return "\n".join(parts)

    timings: dict[str, Any] = {}
    t0 = time.monotonic()
    run(*compose, "up", "-d", stdout=subprocess.DEVNULL)
    try:
        timings["up_s"] = round(time.monotonic() - t0, 1)
        timings["scorer_healthy_s"] = round(
            wait("scorer /healthz", lambda: bool(metrics(SCORER)), 300, logs), 1
        )
        batch = traces()
        t1 = time.monotonic()
        run(
            "podman",
            "exec",
            "-i",
            container("scorer"),
            "tapd",
            "produce",
            "-",
            "--topic",
            "tap.traces",
            input=b"\n".join(batch) + b"\n",
            stdout=subprocess.DEVNULL,
        )
        timings["traces"] = len(batch)
        wait(
            "the first lift label",
            lambda: metrics(SCORER).get("tapd_lift_labels_total", 0) >= 1,
            1200,
            logs,
        )
        timings["first_label_s"] = round(time.monotonic() - t1, 1)
        wait(
            "Prometheus to scrape the label",
            lambda: (prometheus_value('tapd_lift_labels_total{job="tapd-scorer"}') or 0) >= 1,
            120,
            logs,
        )
        timings["prometheus_scraped_s"] = round(time.monotonic() - t1, 1)
        m = metrics(SCORER)
        timings["dispatched"] = int(
            sum(v for k, v in m.items() if k.startswith("tapd_dispatches_total"))
        )
        timings["labels"] = int(m.get("tapd_lift_labels_total", 0))
    finally:
        t2 = time.monotonic()
        subprocess.run([*compose, "down", "-v"], env=env, capture_output=True, check=False)
        timings["down_s"] = round(time.monotonic() - t2, 1)
    timings["total_s"] = round(time.monotonic() - t0, 1)
    print(json.dumps({"stack": timings}), flush=True)


if __name__ == "__main__":
    main()
