"""Durable predictor snapshots: the model versions.

The label history is the source of truth; it lives in the scorer's state
store (:class:`daemon.runtime.state.StateStore`), written in the same
transaction as the scorer snapshot that remembers each label as learned.
Model versions are snapshots of the predictor taken at promotions and
checkpoints; a restart loads the latest one and replays the labels after its
sequence number, so nothing learned since is lost.

Layout (the service uses ``<state_dir>/models`` as the store's root)::

    models/<version>.<label_seq>/manifest.json   version, stage, label counts, score, schema
    models/<version>.<label_seq>/state.pkl       online stages, label history (pickle)
    models/<version>.<label_seq>/lgbm-<i>.txt    LightGBM members as text model strings
    models/latest                                name of the newest snapshot

Every write is atomic (temp file or directory, then rename), so a SIGKILL at
any moment leaves either the old or the new snapshot, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

from daemon.core.predictor import Manifest, Snapshot


class ModelStore:
    """Versioned predictor snapshots with a ``latest`` pointer."""

    def __init__(self, root: Path | str, keep: int = 5) -> None:
        if keep < 1:
            raise ValueError(f"keep: must be >= 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
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
        self.prune()
        return m.name

    def pin(self, name: str) -> None:
        """Make snapshot ``name`` the one the next start loads (a rollback)."""
        if not (self.root / name / "manifest.json").exists():
            raise ValueError(f"{name}: no such predictor snapshot in {self.root}")
        _atomic_write(self.root / "latest", name.encode())

    def prune(self) -> list[str]:
        """Delete all but the newest ``keep`` snapshots (never the latest); what was deleted."""
        latest = self.latest()
        names = sorted(self.versions(), key=_order)
        old = [n for n in names[: max(0, len(names) - self.keep)] if n != latest]
        for name in old:
            shutil.rmtree(self.root / name, ignore_errors=True)
        return old

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


def _order(name: str) -> tuple[int, int]:
    """``v3.000000060`` → (3, 60): snapshots in the order they were taken."""
    version, _, seq = name.partition(".")
    return int(version.lstrip("v") or 0), int(seq or 0)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
