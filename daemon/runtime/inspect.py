"""Read access to a scorer's state: what ``tapd status``, ``cohorts``, ``explain``,
``models`` and ``policies`` show.

Where the answers come from (one code path for both cases):

* A running scorer serves them on its admin API (``GET /admin/status`` ...),
  from its state store as last persisted (at most one poll batch old), its
  live metrics (lag, pause, readiness), its thresholds and the decisions it
  made since it started.
* With no scorer running, the CLI builds the same :class:`ScorerInspector`
  over the state directory, read-only (SQLite ``mode=ro``: inspection never
  writes a scorer's state), and over the log for lag and decisions.

Sources: ``<state_dir>/scorer-state.sqlite`` (snapshot with open and pending
cohorts, in-flight dispatches, learned cohort ids; consumed offsets; labels;
threshold overrides), ``<state_dir>/models`` (predictor snapshots), the
policy store, and the decisions topic (``tap.decisions``, keyed by cohort id).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.config import TapdSettings
from daemon.core.journal import fill
from daemon.runtime.modelstore import ModelStore
from daemon.runtime.state import journal_rows
from daemon.runtime.thresholds import read_overrides
from streams.rejection import Rejection

STATE_FILE = "scorer-state.sqlite"
COHORT_STATES = ("open", "pending", "in_flight")
DECISIONS_KEPT = 10_000


@dataclass
class StateView:
    """The scorer's persisted state, read once."""

    snapshot: dict[str, Any] | None
    offsets: dict[tuple[str, int], int]
    labels: dict[str, dict[str, Any]]  # cohort id -> label
    n_labels: int

    @property
    def exists(self) -> bool:
        return self.snapshot is not None


def read_state(path: Path, with_labels: bool = True) -> StateView:
    """The state file, read-only; an empty view when there is none yet."""
    if not Path(path).exists():
        return StateView(None, {}, {}, 0)
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)
    try:
        row = db.execute("SELECT body FROM snapshot WHERE id = 0").fetchone()
        snap = fill(json.loads(row[0]), journal_rows(db)) if row else None
        offsets = {
            (str(t), int(p)): int(o)
            for t, p, o in db.execute("SELECT topic, part, next_offset FROM offsets")
        }
        labels: dict[str, dict[str, Any]] = {}
        if with_labels:
            for cid, body in db.execute("SELECT cohort_id, body FROM labels ORDER BY seq"):
                labels[str(cid)] = json.loads(body)
        n = int(db.execute("SELECT COUNT(*) FROM labels").fetchone()[0])
    except sqlite3.OperationalError:
        return StateView(None, {}, {}, 0)
    finally:
        db.close()
    return StateView(snap, offsets, labels, n)


def _label(label: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "realized_lift": label.get("realized_lift"),
        "predicted_lift": label.get("predicted_lift"),
        "selection": label.get("selection"),
        "model_version": label.get("model_version"),
        "learned_ts": label.get("ts"),
    }


@dataclass
class Live:
    """What only a running scorer knows (None when inspecting a stopped one)."""

    sample: Callable[[str, dict[str, str] | None], float | None]
    ready: Callable[[], Mapping[str, bool]]
    thresholds: Any  # ThresholdsHolder
    decisions: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    request_rollback: Callable[[str, str], None] | None = None

    def remember(self, decisions: Any) -> None:
        for d in decisions:
            body = d.to_json() if hasattr(d, "to_json") else dict(d)
            self.decisions[body["cohort_id"]] = body
            self.decisions.move_to_end(body["cohort_id"])
        while len(self.decisions) > DECISIONS_KEPT:
            self.decisions.popitem(last=False)


class ScorerInspector:
    """Answers for ``tapd status`` & co over a state directory (and a live scorer)."""

    def __init__(
        self,
        settings: TapdSettings,
        live: Live | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.live = live
        self.clock = clock
        self.state_path = Path(settings.state_dir) / STATE_FILE
        self.models_dir = Path(settings.state_dir) / "models"

    # --- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        st = read_state(self.state_path, with_labels=False)
        snap = st.snapshot or {}
        cohorts = snap.get("cohorts", {})
        in_flight = snap.get("in_flight", [])
        thresholds = self._thresholds()
        out: dict[str, Any] = {
            "scorer": "running" if self.live else "not running",
            "state_dir": str(self.settings.state_dir),
            "state": "present" if st.exists else "none yet",
            "transport": {
                "kind": self.settings.transport.kind,
                **(
                    {"bootstrap_servers": self.settings.transport.bootstrap_servers}
                    if self.settings.transport.kind == "kafka"
                    else {"embedded_path": str(self.settings.transport.embedded_path)}
                ),
            },
            "cohorts": {
                "open": len(_open_groups(cohorts)),
                "pending": len(snap.get("pending", [])),
                "in_flight": len(in_flight),
                "max_in_flight": thresholds.get("max_in_flight"),
            },
            "labels": st.n_labels,
            "policy_version": (cohorts.get("versions") or [None])[-1],
            "predictor": self._predictor(),
            "lag": self._lag(st),
            "thresholds": {
                "shadow_mode": thresholds.get("shadow_mode"),
                "overrides": self._overrides(),
            },
        }
        if self.live is not None:
            s = self.live.sample
            out["ready"] = dict(self.live.ready())
            out["paused"] = bool(s("tapd_consumption_paused", None) or 0)
            out["dead_letters"] = {
                k: v for k, v in self._by_label("tapd_dead_letters_total", "stage").items() if v
            }
        return out

    def _thresholds(self) -> dict[str, Any]:
        if self.live is not None:
            return dict(self.live.thresholds.current.model_dump(mode="json"))
        values = self.settings.thresholds.model_dump(mode="json")
        path = self.settings.service.thresholds_file
        if path is not None and Path(path).exists():
            from daemon.config import read_thresholds_file

            with contextlib.suppress(ValueError):
                values.update(read_thresholds_file(Path(path)))
        for o in read_overrides(self.state_path):
            if not o.expired(self.clock()):
                values[o.name] = o.value
        return values

    def _overrides(self) -> dict[str, Any]:
        if self.live is not None:
            return dict(self.live.thresholds.view()["overrides"])
        return {
            o.name: o.to_json()
            for o in read_overrides(self.state_path)
            if not o.expired(self.clock())
        }

    def _by_label(self, name: str, label: str) -> dict[str, float]:
        from daemon.core.vocabulary import DEAD_LETTER_STAGES

        assert self.live is not None
        out = {}
        for v in DEAD_LETTER_STAGES:
            got = self.live.sample(name, {label: v})
            if got is not None:
                out[v] = got
        return out

    def _predictor(self) -> dict[str, Any]:
        store = ModelStore(self.models_dir) if self.models_dir.exists() else None
        latest = store.latest() if store else None
        out: dict[str, Any] = {"latest_snapshot": latest}
        if store is not None and latest is not None:
            m = _manifest(self.models_dir / latest)
            out.update(
                stage=m.get("stage"), version=f"v{m.get('version')}", labels=m.get("n_labels")
            )
        if self.live is not None:
            from daemon.core.vocabulary import PREDICTOR_STAGES

            s = self.live.sample
            for stage in PREDICTOR_STAGES:
                if s("tapd_predictor_stage", {"stage": stage}) == 1.0:
                    out["stage"] = stage
            version = s("tapd_predictor_model_version", None)
            if version is not None:
                out["version"] = f"v{int(version)}"
            labels = s("tapd_predictor_labels", None)
            if labels is not None:
                out["labels"] = int(labels)
        return out

    def _lag(self, st: StateView) -> dict[str, Any]:
        topics = self.settings.topics
        if self.live is not None:
            return {
                t: int(v)
                for t in (topics.traces, topics.lift, topics.dlq)
                if (v := self.live.sample("tapd_consumer_lag_messages", {"topic": t})) is not None
            }
        # Not running: the log's end offsets minus what the state has consumed.
        from daemon.runtime.logread import extents

        out: dict[str, Any] = {}
        for t in (topics.traces, topics.lift, topics.dlq):
            try:
                ext = extents(self.settings.transport, t)
            except Exception as e:  # an unreachable broker: say so, do not fail status
                out[t] = f"unavailable: {type(e).__name__}"
                continue
            out[t] = sum(max(0, e.end - st.offsets.get((t, p), e.begin)) for p, e in ext.items())
        return out

    # --- cohorts ---------------------------------------------------------------------

    def cohorts(self, state: str | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        if state is not None and state not in COHORT_STATES:
            raise ValueError(f"state: one of {', '.join(COHORT_STATES)}, got {state!r}")
        snap = read_state(self.state_path, with_labels=False).snapshot or {}
        now = self.clock()
        out: list[dict[str, Any]] = []
        if state in (None, "open"):
            for part, g in _open_groups(snap.get("cohorts", {})):
                traces = g.get("traces", [])
                out.append(
                    {
                        "state": "open",
                        "cohort_id": None,  # assigned when the cohort closes
                        "partition": part,
                        "slice_key": g.get("slice_key"),
                        "n_groups": len(traces),
                        "opened_ts": g.get("opened_ts"),
                        "age_s": round(now - float(g.get("opened_ts", now)), 1),
                        "trace_ids": [_trace_id(t) for t in traces[:16]],
                    }
                )
        if state in (None, "pending"):
            for c in snap.get("pending", []):
                out.append(
                    {
                        "state": "pending",
                        "cohort_id": c.get("cohort_id"),
                        "slice_key": c.get("slice_key"),
                        "n_groups": len(c.get("traces", [])),
                        "closed_ts": c.get("closed_ts"),
                        "cause": c.get("cause"),
                        "age_s": round(now - float(c.get("closed_ts", now)), 1),
                    }
                )
        if state in (None, "in_flight"):
            lease = self._thresholds().get("dispatch_timeout_s")
            for cid, selection, predicted, ts in snap.get("in_flight", []):
                age = now - float(ts)
                out.append(
                    {
                        "state": "in_flight",
                        "cohort_id": cid,
                        "selection": selection,
                        "predicted_lift": predicted,
                        "dispatched_ts": ts,
                        "age_s": round(age, 1),
                        "lease_left_s": None if lease is None else round(float(lease) - age, 1),
                    }
                )
        return out[:limit]

    def explain(self, cohort_id: str, scan: int = 100_000) -> dict[str, Any] | None:
        """Everything known about one cohort: its state, the decision and why, its lift."""
        st = read_state(self.state_path)
        snap = st.snapshot or {}
        out: dict[str, Any] = {"cohort_id": cohort_id, "state": None}
        for c in snap.get("pending", []):
            if c.get("cohort_id") == cohort_id:
                out["state"] = "pending"
                out["slice_key"] = c.get("slice_key")
                out["trace_ids"] = [_trace_id(t) for t in c.get("traces", [])]
        for cid, selection, predicted, ts in snap.get("in_flight", []):
            if cid == cohort_id:
                out["state"] = "in_flight"
                out["in_flight"] = {
                    "selection": selection,
                    "predicted_lift": predicted,
                    "dispatched_ts": ts,
                    "age_s": round(self.clock() - float(ts), 1),
                }
        if cohort_id in st.labels:
            out["state"] = "learned"
            out["lift"] = _label(st.labels[cohort_id])
        elif cohort_id in set(snap.get("learned", [])):
            out["state"] = "learned"
        decision = self.live.decisions.get(cohort_id) if self.live is not None else None
        if decision is None:
            decision = self._find_decision(cohort_id, scan)
        if decision is not None:
            out["decision"] = {k: v for k, v in decision.items() if k != "schema"}
            if out["state"] is None:
                out["state"] = "dispatched" if decision.get("dispatched") else "decided"
        if out["state"] is None:
            return None
        return out

    def _find_decision(self, cohort_id: str, scan: int) -> dict[str, Any] | None:
        """The cohort's decision record on the decisions topic (the newest ``scan`` records)."""
        from daemon.runtime.logread import NoSuchTopic, read

        key = cohort_id.encode()
        found = None
        try:
            for rec in read(self.settings.transport, self.settings.topics.decisions, last=scan):
                if rec.key == key or (rec.key is None and key in rec.value):
                    try:
                        body = json.loads(rec.value)
                    except ValueError:
                        continue
                    if isinstance(body, dict) and body.get("cohort_id") == cohort_id:
                        found = body
        except NoSuchTopic:
            return None
        return found

    # --- models and policies -----------------------------------------------------------

    def models(self) -> dict[str, Any]:
        if not self.models_dir.exists():
            return {"latest": None, "snapshots": []}
        store = ModelStore(self.models_dir)
        latest = store.latest()
        snaps = []
        # In the order they were taken (a snapshot written after a rollback
        # may carry a lower version number than an older one).
        manifests = {n: _manifest(self.models_dir / n) for n in store.versions()}
        for name in sorted(
            manifests, key=lambda n: (float(manifests[n].get("created_ts") or 0), _order(n))
        ):
            m = manifests[name]
            snaps.append(
                {
                    "name": name,
                    "version": f"v{m.get('version')}",
                    "stage": m.get("stage"),
                    "labels": m.get("n_labels"),
                    "label_seq": m.get("label_seq"),
                    "holdout_score": m.get("holdout_score"),
                    # A build loads only its own schema's snapshots (docs/FEATURES.md).
                    "feature_schema": m.get("feature_schema"),
                    "created_ts": m.get("created_ts"),
                    "latest": name == latest,
                }
            )
        return {"latest": latest, "snapshots": snaps}

    def previous_model(self) -> str | None:
        names = [s["name"] for s in self.models()["snapshots"]]
        latest = self.models()["latest"]
        if latest not in names:
            return names[-1] if names else None
        i = names.index(latest)
        return names[i - 1] if i > 0 else None

    def rollback(self, version: str | None, who: str) -> dict[str, Any]:
        """Make ``version`` (default: the snapshot before the latest) the one a scorer loads.

        A running scorer is asked to restart onto it (it stops, moves the
        pointer after its last checkpoint, and starts again); a stopped one
        simply finds it at its next start.
        """
        models = self.models()
        names = [s["name"] for s in models["snapshots"]]
        target = version or self.previous_model()
        if target is None:
            raise Rejection("version", "no earlier predictor snapshot to roll back to")
        if target not in names:
            # A bare version ("v3") means its newest snapshot.
            matching = [n for n in names if n.split(".", 1)[0] == target]
            if not matching:
                raise Rejection(
                    "version", f"{target}: no such snapshot (have: {', '.join(names) or 'none'})"
                )
            target = matching[-1]
        previous = models["latest"]
        if self.live is not None and self.live.request_rollback is not None:
            self.live.request_rollback(target, who)
            return {"latest": previous, "rollback_to": target, "restarting": True, "who": who}
        ModelStore(self.models_dir).pin(target)
        return {"latest": target, "previous": previous, "restarting": False, "who": who}

    def policies(self) -> dict[str, Any]:
        from daemon.policy.store import PolicyStore, version_name

        store = PolicyStore(self.settings.policy_store_dir())
        ledger = Path(self.settings.state_dir) / "trainer" / "ledger.sqlite"
        produced: dict[int, str] = {}
        lifts: dict[str, float] = {}
        if ledger.exists():
            db = sqlite3.connect(f"file:{ledger}?mode=ro", uri=True, timeout=30.0)
            try:
                for n, cid in db.execute("SELECT n, cohort_id FROM versions"):
                    produced[int(n)] = str(cid)
                for cid, body in db.execute("SELECT cohort_id, result FROM lifts"):
                    lifts[str(cid)] = float(json.loads(body).get("nll_lift", 0.0))
            except sqlite3.OperationalError:
                pass
            finally:
                db.close()
        versions: list[dict[str, Any]] = [
            {
                "version": "v0",
                "path": str(self.settings.policy.model_path)
                if self.settings.policy.model_path
                else None,
                "base": True,
            }
        ]
        for n in store.versions():
            cid = produced.get(n)
            p = store.path(n)
            versions.append(
                {
                    "version": version_name(n),
                    "path": str(p),
                    "bytes": p.stat().st_size if p.exists() else None,
                    "created_ts": p.stat().st_mtime if p.exists() else None,
                    "cohort_id": cid,
                    "nll_lift": lifts.get(cid) if cid else None,
                }
            )
        current = version_name(max(produced)) if produced else None
        return {"store": str(store.root), "current": current, "versions": versions}


def _open_groups(cohorts: Mapping[str, Any]) -> list[tuple[str | None, dict[str, Any]]]:
    """Open cohorts of a snapshot's cohort builder, with the traces partition that
    holds each (a partitioned builder keeps one builder per partition)."""
    if "parts" in cohorts:
        return [
            (key, dict(g))
            for key, part in sorted(cohorts["parts"].items())
            for g in part.get("cohorts", {}).get("open", [])
        ]
    return [(None, dict(g)) for g in cohorts.get("open", [])]


def _trace_id(held: Any) -> str | None:
    """The id of a trace as a snapshot holds it: its fields, or a reference to
    its original message (``[topic, partition, offset, text]``)."""
    if isinstance(held, Mapping):
        tid = held.get("trace_id")
        return str(tid) if tid is not None else None
    if isinstance(held, list | tuple) and len(held) == 4 and isinstance(held[3], str):
        try:
            body = json.loads(held[3])
        except ValueError:
            return None
        tid = body.get("trace_id") if isinstance(body, dict) else None
        return str(tid) if tid is not None else None
    return None


def _manifest(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((path / "manifest.json").read_text()))
    except (OSError, ValueError):
        return {}


def _order(name: str) -> tuple[int, int]:
    version, _, seq = name.partition(".")
    try:
        return int(version.lstrip("v") or 0), int(seq or 0)
    except ValueError:
        return (0, 0)
