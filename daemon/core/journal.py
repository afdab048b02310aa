"""An insertion-ordered dict that remembers which of its keys changed.

The scorer's id windows (trace ids decided, per partition: 100,000 by
default; lift cohort ids learned: 200,000) and its open cohorts (10,000 per
partition by default) are part of what a crash must not lose. Written whole
with every poll batch, they made each batch's transaction cost as much as the
windows and the open state, whatever the batch. A :class:`Journaled` dict
records the keys changed since the state store last wrote it, so that the
store writes those rows only (:mod:`daemon.runtime.state`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

K = TypeVar("K")
V = TypeVar("V")

# Changes remembered before the journal gives up and asks for a full rewrite:
# bounds its memory where nobody drains it (a builder used without a store).
# A poll batch changes at most a few per record (max_poll_records: 500).
MAX_CHANGES = 16_384


class Journaled(OrderedDict[K, V]):
    """An ``OrderedDict`` whose changes since :meth:`drained` are in :attr:`changes`.

    ``changes[key]`` is True when the key's row must be (re)written at the end
    of the order (a new key, or one deleted and set again), False when only
    its value changed in place; a changed key no longer in the dict was
    deleted. :attr:`overflowed` says that the changes were too many to keep:
    the whole dict must be written.
    """

    def __init__(self, items: Iterable[tuple[K, V]] = ()) -> None:
        self.changes: dict[K, bool] = {}
        self.overflowed = False
        super().__init__(items)
        self.drained()

    def drained(self) -> None:
        """The store has written every change."""
        self.changes = {}
        self.overflowed = False

    def _moved(self, key: K) -> None:
        # A key (re)inserted goes to the end of the order, after every change before it.
        self.changes.pop(key, None)
        self.changes[key] = True
        if len(self.changes) > MAX_CHANGES:
            self.changes = {}
            self.overflowed = True

    def __setitem__(self, key: K, value: V) -> None:
        if key in self:
            super().__setitem__(key, value)
            if key not in self.changes:
                self.changes[key] = False
            return
        super().__setitem__(key, value)
        self._moved(key)

    def __delitem__(self, key: K) -> None:
        super().__delitem__(key)
        self._moved(key)

    def pop(self, key: K, *default: V) -> V:  # type: ignore[override]
        if key not in self:
            if default:
                return default[0]
            raise KeyError(key)
        value = super().pop(key)
        self._moved(key)
        return value

    def popitem(self, last: bool = True) -> tuple[K, V]:
        key, value = super().popitem(last)
        self._moved(key)
        return key, value

    def move_to_end(self, key: K, last: bool = True) -> None:
        if not last:
            # The store's rows are ordered by when they were written: no front.
            raise NotImplementedError("a Journaled dict moves keys to the end only")
        super().move_to_end(key)
        self._moved(key)

    def clear(self) -> None:
        super().clear()
        self.changes = {}
        self.overflowed = True


# A journaled window's rows: (key, value) in the dict's order.
Rows = list[tuple[str, str | None]]


class Stored(Protocol):
    """A journaled value that is not text itself: its row holds :meth:`stored`.

    Held originals are kept as bytes in memory; made text only when written.
    """

    def stored(self) -> str: ...


def stored(value: str | Stored | None) -> str | None:
    """A journaled value as its row holds it."""
    return value if value is None or isinstance(value, str) else value.stored()


def section(path: Sequence[str], as_list: bool = False, as_values: bool = False) -> str:
    """A journaled window's name: where it goes in a snapshot (the path of keys to
    it) and as what (a list of its keys, the dict itself, or, ``as_values``, a
    list of its values, each row's text being the JSON of one)."""
    kind = "values" if as_values else "list" if as_list else "dict"
    return json.dumps([kind, *path], separators=(",", ":"))


# The held traces' originals: where each was read (:func:`held_key`) -> its text.
# A journaled snapshot refers to a held trace as [topic, partition, offset].
HELD = section(("held",))


def held_key(where: Sequence[Any]) -> str:
    """The row key of the original read at ``[topic, partition, offset]``
    (unambiguous: the topic, whatever its characters, comes last)."""
    return f"{int(where[1])}:{int(where[2])}:{where[0]}"


def fill(snapshot: dict[str, Any], sections: Mapping[str, Rows]) -> dict[str, Any]:
    """``snapshot`` with each journaled window put back where a journaled snapshot
    left it empty, and each held trace's original back in its reference
    (``[topic, partition, offset, text]``, as a whole snapshot holds it). A
    section whose place is gone (a partition no longer held) is left out."""
    for name, rows in sections.items():
        kind, *path = json.loads(name)
        node: Any = snapshot
        for p in path[:-1]:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and path:
            if kind == "values":
                node[path[-1]] = [json.loads(v) for _, v in rows if v is not None]
            else:
                node[path[-1]] = [k for k, _ in rows] if kind == "list" else dict(rows)
    held = snapshot.pop("held", None)
    if isinstance(held, dict):
        _attach(snapshot, held)
    return snapshot


def _attach(snapshot: dict[str, Any], held: Mapping[str, Any]) -> None:
    # Every "traces" list (open groups, queued cohorts, wherever they sit).
    stack: list[Any] = [snapshot]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for k, v in items:
            if k == "traces" and isinstance(v, list):
                for i, ref in enumerate(v):
                    if isinstance(ref, list) and len(ref) == 3:
                        try:
                            text = held.get(held_key(ref))
                        except (TypeError, ValueError):  # not a reference of ours
                            continue
                        if text is not None:
                            v[i] = [*ref, text]
            elif isinstance(v, dict | list):
                stack.append(v)
