"""The scorer's thresholds as explicit layers: configuration, file, run-time overrides.

    effective = configuration (defaults, config file, TAPD_THRESHOLDS__*)
              < thresholds file (the desired state; a ConfigMap in Kubernetes)
              < overrides (set at run time through the admin API: who, when,
                why, optional expiry)

* The file is the desired state. Re-reading it replaces the file layer only:
  an override stays in force whatever the file says (a ConfigMap sync or a
  ``touch`` never silently undoes an on-call change); a file value that an
  override hides is reported (``shadowed``) in the audit record and the log.
* An override lasts until it is cleared (``DELETE
  /admin/thresholds/overrides/NAME``, ``tapd thresholds clear NAME``) or
  expires. Overrides are kept in the scorer's state store, so they survive a
  restart, and are visible in ``GET /admin/thresholds``, ``tapd thresholds
  get`` and ``tapd_threshold_override{name}``.
* Every change is validated strictly (no booleans for numbers, no numeric
  strings, no string booleans) and across fields on the whole effective set,
  and the dispatch lease may not go under twice the slowest recently observed
  dispatch-to-lift round trip (``lease_floor``): a bad change raises
  :class:`ThresholdError` and changes nothing.
* A change that alters neither an effective value nor an override is a
  no-op: nothing is recorded, logged or counted.

The scoring loop reads :attr:`ThresholdsHolder.current` (a frozen
:class:`~daemon.config.Thresholds`, swapped whole); the admin API, the file
watcher and expiry call the other methods from their own threads.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydantic

from daemon.config import Thresholds, read_thresholds_file
from streams.durable import connect_durable
from streams.rejection import Rejection

NAMES = tuple(Thresholds.model_fields)
HISTORY = 200


class ThresholdError(Rejection):
    """A refused threshold change; ``field`` is the threshold's name (``$``: the whole)."""

    def __str__(self) -> str:
        return f"thresholds.{self.field}: {self.reason}"


@dataclass(frozen=True)
class Override:
    name: str
    value: Any
    who: str
    when: float
    why: str | None = None
    expires_at: float | None = None
    principal: str | None = None

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class AuditRecord:
    """One recorded change: who did what to which layer, and what it changed."""

    who: str
    source: str  # admin, file, signal, expired (daemon.core.vocabulary.THRESHOLD_SOURCES)
    action: str  # override, clear, file, expire
    what: dict[str, Any]  # effective values that changed: name -> new value
    before: dict[str, Any]
    after: dict[str, Any]
    when: float
    why: str | None = None
    expires_at: float | None = None
    principal: str | None = None
    # Layer changes that did not change an effective value, e.g. an override
    # set to the value the file gives, or a file value hidden by an override.
    overrides_set: dict[str, Any] = field(default_factory=dict)
    overrides_cleared: list[str] = field(default_factory=list)
    shadowed: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _problem(exc: pydantic.ValidationError, changed: Iterable[str]) -> ThresholdError:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"])
    msg = str(err["msg"]).removeprefix("Value error, ")
    if not loc:
        # A cross-field rule: name the changed field it mentions.
        loc = next((n for n in changed if n in msg), "$")
    elif err["type"] == "extra_forbidden":
        msg = f"unknown threshold (known: {', '.join(NAMES)})"
    got = err.get("input")
    if err["loc"] and not isinstance(got, dict):
        msg = f"{msg} (got {json.dumps(got, default=str)})"
    return ThresholdError(loc, msg)


class OverrideStore:
    """Overrides in the scorer's state file (table ``threshold_overrides``)."""

    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS threshold_overrides (
        name TEXT PRIMARY KEY, body TEXT NOT NULL);
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = connect_durable(self.path)
        self._db.executescript(self._SCHEMA)
        self._lock = threading.Lock()

    def load(self) -> list[Override]:
        with self._lock:
            rows = self._db.execute("SELECT body FROM threshold_overrides").fetchall()
        out = []
        for (body,) in rows:
            d = json.loads(body)
            out.append(Override(**{k: d.get(k) for k in Override.__dataclass_fields__}))
        return out

    def replace(self, overrides: Mapping[str, Override]) -> None:
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.execute("DELETE FROM threshold_overrides")
                cur.executemany(
                    "INSERT INTO threshold_overrides (name, body) VALUES (?, ?)",
                    [(o.name, json.dumps(o.to_json())) for o in overrides.values()],
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def close(self) -> None:
        self._db.close()


def read_overrides(path: Path) -> list[Override]:
    """The overrides stored in a scorer state file, read-only (inspection)."""
    if not Path(path).exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    try:
        rows = db.execute("SELECT body FROM threshold_overrides").fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()
    return [
        Override(**{k: json.loads(b).get(k) for k in Override.__dataclass_fields__})
        for (b,) in rows
    ]


class ThresholdsHolder:
    """The layered thresholds; see the module docstring."""

    def __init__(
        self,
        base: Thresholds | None = None,
        *,
        store: OverrideStore | None = None,
        on_change: Callable[[AuditRecord], None] | None = None,
        lease_floor: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.base = base or Thresholds()
        self.store = store
        self.on_change = on_change
        self.lease_floor = lease_floor
        self.clock = clock
        self.file_values: dict[str, Any] = {}
        self.file_path: Path | None = None
        self.overrides: dict[str, Override] = {}
        self.history: list[AuditRecord] = []
        self._lock = threading.RLock()
        self._current = self.base
        self._next_expiry: float | None = None
        if store is not None:
            self._restore(store.load())

    # --- reading --------------------------------------------------------------

    @property
    def current(self) -> Thresholds:
        """The effective thresholds (expired overrides drop out on the next read)."""
        nxt = self._next_expiry
        if nxt is not None and self.clock() >= nxt:
            self.expire()
        return self._current

    def source(self, name: str) -> str:
        if name in self.overrides:
            return "override"
        if name in self.file_values:
            return "file"
        return "config"

    def view(self) -> dict[str, Any]:
        """Every layer, for ``GET /admin/thresholds`` and ``tapd thresholds get``."""
        with self._lock:
            effective = self.current.model_dump(mode="json")
            return {
                "effective": effective,
                "source": {n: self.source(n) for n in NAMES},
                "overrides": {n: o.to_json() for n, o in sorted(self.overrides.items())},
                "file": dict(self.file_values),
                "thresholds_file": str(self.file_path) if self.file_path else None,
                "config": self.base.model_dump(mode="json"),
            }

    # --- changing -------------------------------------------------------------

    def apply(
        self,
        changes: Mapping[str, Any],
        who: str,
        source: str = "admin",
        *,
        why: str | None = None,
        expires_at: float | None = None,
        principal: str | None = None,
    ) -> AuditRecord | None:
        """Set overrides; the record, or ``None`` for a no-op."""
        if not who:
            raise ThresholdError("who", "a change must name who made it")
        if not changes:
            raise ThresholdError("$", "no threshold to change")
        for name in changes:
            if name not in NAMES:
                raise ThresholdError(name, f"unknown threshold (known: {', '.join(NAMES)})")
        now = self.clock()
        if expires_at is not None and expires_at <= now:
            raise ThresholdError("expires_at", "must be in the future")
        with self._lock:
            self._drop_expired(now)
            current = self._current.model_dump()
            # The effective set with the changes: strict types, bounds and
            # cross-field rules, before anything is touched.
            try:
                checked = Thresholds.strict({**current, **dict(changes)})
            except pydantic.ValidationError as exc:
                raise _problem(exc, changes) from exc
            new_overrides = dict(self.overrides)
            touched: dict[str, Any] = {}
            for name in changes:
                value = getattr(checked, name)
                old = self.overrides.get(name)
                if old is None and current[name] == value:
                    continue  # already in effect from the file or the configuration
                if (
                    old is not None
                    and old.value == value
                    and old.why == why
                    and old.expires_at == expires_at
                ):
                    continue
                new_overrides[name] = Override(
                    name, value, who, now, why=why, expires_at=expires_at, principal=principal
                )
                touched[name] = value
            if not touched:
                return None
            new = self._effective(self.file_values, new_overrides, touched)
            return self._commit(
                new,
                new_overrides,
                self.file_values,
                AuditRecord(
                    who=who,
                    source=source,
                    action="override",
                    what={},
                    before={},
                    after={},
                    when=now,
                    why=why,
                    expires_at=expires_at,
                    principal=principal,
                    overrides_set=touched,
                ),
            )

    def clear(
        self,
        names: Iterable[str],
        who: str,
        source: str = "admin",
        *,
        why: str | None = None,
        principal: str | None = None,
    ) -> AuditRecord | None:
        """Remove overrides (``names`` empty: all of them); ``None`` if there were none."""
        with self._lock:
            wanted = list(names) or list(self.overrides)
            for name in wanted:
                if name not in NAMES:
                    raise ThresholdError(name, f"unknown threshold (known: {', '.join(NAMES)})")
            gone = [n for n in wanted if n in self.overrides]
            if not gone:
                return None
            new_overrides = {n: o for n, o in self.overrides.items() if n not in gone}
            new = self._effective(self.file_values, new_overrides, gone)
            return self._commit(
                new,
                new_overrides,
                self.file_values,
                AuditRecord(
                    who=who,
                    source=source,
                    action="clear",
                    what={},
                    before={},
                    after={},
                    when=self.clock(),
                    why=why,
                    principal=principal,
                    overrides_cleared=gone,
                ),
            )

    def reload_from_file(
        self, path: Path | str, who: str = "tapd:file", source: str = "file"
    ) -> AuditRecord | None:
        """Replace the file layer; overrides stay. ``None`` when the file sets what it set."""
        path = Path(path)
        try:
            values = read_thresholds_file(path)
        except ValueError as e:
            name, _, reason = str(e).partition(": ")
            raise ThresholdError(name if reason else "$", f"{reason or e} (in {path})") from e
        with self._lock:
            self.file_path = path
            if values == self.file_values:
                return None
            changed = {
                n
                for n in set(values) | set(self.file_values)
                if values.get(n) != self.file_values.get(n)
            }
            try:
                Thresholds.strict({**self.base.model_dump(), **values})
            except pydantic.ValidationError as exc:
                problem = _problem(exc, changed)
                raise ThresholdError(problem.field, f"{problem.reason} (in {path})") from exc
            new = self._effective(values, self.overrides, changed)
            shadowed = {
                n: {"file": values.get(n), "override": self.overrides[n].value}
                for n in sorted(changed)
                if n in self.overrides
            }
            return self._commit(
                new,
                self.overrides,
                values,
                AuditRecord(
                    who=who,
                    source=source,
                    action="file",
                    what={},
                    before={},
                    after={},
                    when=self.clock(),
                    shadowed=shadowed,
                ),
            )

    def expire(self) -> AuditRecord | None:
        """Drop overrides past their expiry; the record, or ``None`` if none expired."""
        with self._lock:
            return self._drop_expired(self.clock())

    # --- internals --------------------------------------------------------------

    def _drop_expired(self, now: float) -> AuditRecord | None:
        gone = [n for n, o in self.overrides.items() if o.expired(now)]
        if not gone:
            self._next_expiry = self._min_expiry(self.overrides)
            return None
        kept = {n: o for n, o in self.overrides.items() if n not in gone}
        try:
            new = self._effective(self.file_values, kept, gone, check_floor=False)
        except ThresholdError:
            # What the override hid is no longer valid with the rest: fall
            # back to the file and configuration layers only.
            kept = {}
            new = self._effective(self.file_values, kept, gone, check_floor=False)
            gone = list(self.overrides)
        return self._commit(
            new,
            kept,
            self.file_values,
            AuditRecord(
                who="tapd:expiry",
                source="expired",
                action="expire",
                what={},
                before={},
                after={},
                when=now,
                overrides_cleared=gone,
            ),
        )

    def _effective(
        self,
        file_values: Mapping[str, Any],
        overrides: Mapping[str, Override],
        changed: Iterable[str],
        check_floor: bool = True,
    ) -> Thresholds:
        merged = {
            **self.base.model_dump(),
            **file_values,
            **{n: o.value for n, o in overrides.items()},
        }
        changed = list(changed)
        try:
            new = Thresholds.strict(merged)
        except pydantic.ValidationError as exc:
            raise _problem(exc, changed) from exc
        floor = self.lease_floor() if (check_floor and self.lease_floor) else 0.0
        if (
            floor
            and new.dispatch_timeout_s < floor
            and new.dispatch_timeout_s < self._current.dispatch_timeout_s
        ):
            raise ThresholdError(
                "dispatch_timeout_s",
                f"{new.dispatch_timeout_s:g} s is under {floor:.0f} s, twice the slowest "
                "recent dispatch-to-lift round trip: the lease would free slots of cohorts "
                "still in training",
            )
        return new

    def _commit(
        self,
        new: Thresholds,
        overrides: dict[str, Override],
        file_values: dict[str, Any],
        record: AuditRecord,
    ) -> AuditRecord | None:
        before, after = self._current.model_dump(), new.model_dump()
        what = {k: v for k, v in after.items() if before[k] != v}
        if not what and overrides == self.overrides and file_values == self.file_values:
            return None
        if self.store is not None and overrides != self.overrides:
            self.store.replace(overrides)
        self.overrides = dict(overrides)
        self.file_values = dict(file_values)
        self._current = new
        self._next_expiry = self._min_expiry(self.overrides)
        full = AuditRecord(
            **{
                **asdict(record),
                "what": what,
                "before": {k: before[k] for k in what},
                "after": {k: after[k] for k in what},
            }
        )
        self.history.append(full)
        del self.history[:-HISTORY]
        if self.on_change is not None:
            self.on_change(full)
        return full

    @staticmethod
    def _min_expiry(overrides: Mapping[str, Override]) -> float | None:
        times = [o.expires_at for o in overrides.values() if o.expires_at is not None]
        return min(times) if times else None

    def _restore(self, stored: Iterable[Override]) -> None:
        """Overrides of the last incarnation; invalid or expired ones are dropped."""
        now = self.clock()
        kept: dict[str, Override] = {}
        for o in stored:
            if o.name not in NAMES or o.expired(now):
                continue
            try:
                self._effective(self.file_values, {**kept, o.name: o}, [o.name], check_floor=False)
            except ThresholdError:
                continue
            kept[o.name] = o
        self.overrides = kept
        self._current = self._effective(self.file_values, kept, kept, check_floor=False)
        self._next_expiry = self._min_expiry(kept)
        if self.store is not None:
            self.store.replace(kept)


class RoundTrips:
    """Recent dispatch-to-lift round trips, for the lease floor.

    Fed with the scorer's effects (dispatches and the labels their lifts
    became); ``floor()`` is twice the slowest of the last ``keep`` round
    trips (0 before any).
    """

    def __init__(self, keep: int = 50, factor: float = 2.0) -> None:
        self.factor = factor
        self._sent: dict[str, float] = {}
        self._trips: list[float] = []
        self._keep = keep
        self._lock = threading.Lock()

    def observe(self, fx: Any) -> None:
        with self._lock:
            for d in getattr(fx, "dispatches", ()):
                self._sent[d.cohort_id] = float(d.ts)
            for lb in getattr(fx, "labels", ()):
                sent = self._sent.pop(lb.cohort_id, None)
                if sent is not None and lb.ts >= sent:
                    self._trips.append(float(lb.ts) - sent)
                    del self._trips[: -self._keep]
            if len(self._sent) > 10_000:  # lifts that never came back
                for k in list(self._sent)[: len(self._sent) - 10_000]:
                    del self._sent[k]

    def floor(self) -> float:
        with self._lock:
            return self.factor * max(self._trips) if self._trips else 0.0
