"""Durable predictor state: the label history and the model versions.

The label history is the source of truth: an append-only JSONL log in the
state dir, one lift label per line, each with a sequence number, idempotent by
cohort id (a redelivered lift result is counted once). Model versions are
snapshots of the predictor taken at promotions and checkpoints; a restart
loads the latest one and replays the labels after its sequence number, so
nothing learned since is lost.

Layout in the state dir (the service uses ``<state_dir>/models`` as the
store's root)::

    labels.jsonl
    models/<version>.<label_seq>/manifest.json   version, stage, label counts, score, schema
    models/<version>.<label_seq>/state.pkl       online stages, label history (pickle)
    models/<version>.<label_seq>/lgbm-<i>.txt    LightGBM members as text model strings
    models/latest                                name of the newest snapshot

Every write is atomic (temp file or directory, then rename), so a SIGKILL at
any moment leaves either the old or the new snapshot, never a torn one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Label:
    """One realized lift, as the predictor learned it."""

    seq: int
    cohort_id: str
    features: dict[str, float]
    realized_lift: float
    selection: str = "exploit"
    ts: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> Label:
        d = json.loads(line)
        return cls(
            seq=int(d["seq"]),
            cohort_id=str(d["cohort_id"]),
            features={str(k): float(v) for k, v in d["features"].items()},
            realized_lift=float(d["realized_lift"]),
            selection=str(d.get("selection", "exploit")),
            ts=float(d.get("ts", 0.0)),
        )


class LabelLog:
    """Append-only, idempotent label history (JSONL, fsynced per label)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._labels: list[Label] = []
        self._seen: set[str] = set()
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        kept = 0  # bytes of whole, readable lines
        for lineno, line in enumerate(raw.splitlines(keepends=True), start=1):
            if not line.endswith(b"\n"):
                # A line without its newline is a write cut short by a kill:
                # append returns only after the whole line is synced, so this
                # label was never acknowledged and dropping it is safe.
                break
            if line.strip():
                try:
                    label = Label.from_json(line.decode())
                except (ValueError, KeyError, TypeError) as exc:
                    raise ValueError(f"{self.path}:{lineno}: unreadable label ({exc})") from exc
                self._labels.append(label)
                self._seen.add(label.cohort_id)
            kept += len(line)
        if kept < len(raw):
            with self.path.open("r+b") as f:
                f.truncate(kept)

    def __len__(self) -> int:
        return len(self._labels)

    def __contains__(self, cohort_id: object) -> bool:
        return cohort_id in self._seen

    @property
    def last_seq(self) -> int:
        return self._labels[-1].seq if self._labels else 0

    def append(
        self,
        cohort_id: str,
        features: Mapping[str, float],
        realized_lift: float,
        selection: str = "exploit",
        ts: float | None = None,
    ) -> Label | None:
        """The new label, or ``None`` when this cohort's label is already in the log."""
        if not cohort_id:
            raise ValueError("cohort_id: must be a non-empty string")
        if not math.isfinite(realized_lift):
            raise ValueError(f"realized_lift: not finite ({realized_lift!r})")
        if cohort_id in self._seen:
            return None
        label = Label(
            seq=self.last_seq + 1,
            cohort_id=cohort_id,
            features={k: float(v) for k, v in features.items()},
            realized_lift=float(realized_lift),
            selection=selection,
            ts=time.time() if ts is None else float(ts),
        )
        with self.path.open("a", encoding="utf-8") as f:
            f.write(label.to_json() + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._labels.append(label)
        self._seen.add(cohort_id)
        return label

    def since(self, seq: int) -> Iterator[Label]:
        """Labels with a sequence number above ``seq``, oldest first."""
        return (label for label in self._labels if label.seq > seq)


@dataclass(frozen=True)
class Manifest:
    version: int
    stage: str
    label_seq: int  # the last label the snapshot has learned
    n_labels: int
    holdout_score: float | None
    feature_schema: str
    created_ts: float
    lgbm_members: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"v{self.version}.{self.label_seq:09d}"


@dataclass(frozen=True)
class Snapshot:
    manifest: Manifest
    state: bytes
    lgbm_models: tuple[str, ...]


class ModelStore:
    """Versioned predictor snapshots with a ``latest`` pointer."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def save(self, snapshot: Snapshot) -> str:
        m = snapshot.manifest
        final = self.root / m.name
        if not final.exists():
            tmp = self.root / f".tmp-{m.name}-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            files = {"state.pkl": snapshot.state}
            for i, text in enumerate(snapshot.lgbm_models):
                files[f"lgbm-{i}.txt"] = text.encode()
            files["manifest.json"] = json.dumps(
                {**asdict(m), "lgbm_members": len(snapshot.lgbm_models)}, indent=1, sort_keys=True
            ).encode()
            for fname, data in files.items():
                with (tmp / fname).open("wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            os.rename(tmp, final)
        _atomic_write(self.root / "latest", m.name.encode())
        return m.name

    def latest(self) -> str | None:
        p = self.root / "latest"
        if not p.exists():
            return None
        name = p.read_text().strip()
        return name if (self.root / name / "manifest.json").exists() else None

    def versions(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").exists())

    def load(self, name: str | None = None) -> Snapshot | None:
        name = name or self.latest()
        if name is None:
            return None
        d = self.root / name
        raw = json.loads((d / "manifest.json").read_text())
        manifest = Manifest(**raw)
        models = tuple((d / f"lgbm-{i}.txt").read_text() for i in range(manifest.lgbm_members))
        return Snapshot(manifest=manifest, state=(d / "state.pkl").read_bytes(), lgbm_models=models)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
