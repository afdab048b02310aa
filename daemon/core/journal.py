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
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
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


class Journal(Protocol):
    """What the state store needs of a journaled window (:class:`Journaled`, :class:`Window`)."""

    changes: dict[Any, bool]
    overflowed: bool

    def drained(self) -> None: ...

    def items(self) -> Iterable[tuple[Any, Any]]: ...

    def __contains__(self, key: object) -> bool: ...

    def __getitem__(self, key: Any) -> Any: ...


class Window:
    """A first-in first-out window of ids (trace ids decided, cohort ids learned),
    journaled as :class:`Journaled` is, in about half the memory.

    The windows hold hundreds of thousands of ids per scorer: an ``OrderedDict``
    costs a linked-list node per id on top of its dict entry, and a digest
    (``sha256:`` and 16 hex digits) is a 72-byte string. Here the ids are a
    dict (insertion-ordered) with a deque of the same ids for the oldest one
    (a dict alone finds its first key by scanning past the deleted ones), and
    a digest of that form is held as its number. Values read back as given.

    Ids deleted out of order (a readmitted trace) stay in the deque, counted
    in ``_gone``, and are skipped when they reach its front.
    """

    __slots__ = ("_d", "_gone", "_order", "changes", "overflowed")

    def __init__(self, items: Iterable[tuple[str, str | None]] = ()) -> None:
        self._d: dict[str, int | str | None] = {}
        self._order: deque[str] = deque()
        self._gone: dict[str, int] = {}
        self.changes: dict[Any, bool] = {}
        self.overflowed = False
        for k, v in items:
            self[k] = v
        self.drained()

    @staticmethod
    def _pack(value: str | None) -> int | str | None:
        if isinstance(value, str) and len(value) == 23 and value.startswith("sha256:"):
            try:
                n = int(value[7:], 16)
            except ValueError:
                return value
            if f"sha256:{n:016x}" == value:  # the exact text comes back
                return n
        return value

    @staticmethod
    def _unpack(value: int | str | None) -> str | None:
        return f"sha256:{value:016x}" if isinstance(value, int) else value

    def drained(self) -> None:
        self.changes = {}
        self.overflowed = False

    def _moved(self, key: str) -> None:
        # As Journaled: a key (re)inserted goes to the end of the order.
        self.changes.pop(key, None)
        self.changes[key] = True
        if len(self.changes) > MAX_CHANGES:
            self.changes = {}
            self.overflowed = True

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def keys(self) -> Iterable[str]:
        return self._d.keys()

    def __getitem__(self, key: str) -> str | None:
        return self._unpack(self._d[key])

    def get(self, key: str, default: str | None = None) -> str | None:
        return self._unpack(self._d[key]) if key in self._d else default

    def items(self) -> Iterator[tuple[str, str | None]]:
        for k, v in self._d.items():
            yield k, self._unpack(v)

    def __setitem__(self, key: str, value: str | None) -> None:
        packed = self._pack(value)
        if key in self._d:
            self._d[key] = packed
            if key not in self.changes:
                self.changes[key] = False
            return
        self._d[key] = packed
        self._order.append(key)
        self._moved(key)

    def __delitem__(self, key: str) -> None:
        del self._d[key]
        self._gone[key] = self._gone.get(key, 0) + 1
        self._moved(key)

    def pop(self, key: str, *default: str | None) -> str | None:
        if key not in self._d:
            if default:
                return default[0]
            raise KeyError(key)
        value = self[key]
        del self[key]
        return value

    def popitem(self, last: bool = True) -> tuple[str, str | None]:
        """The oldest (``last=False``: the only end a window is trimmed at)."""
        if last:
            raise NotImplementedError("a Window is trimmed at its oldest end only")
        if not self._d:
            raise KeyError("popitem(): window is empty")
        while True:
            key = self._order.popleft()
            gone = self._gone.get(key)
            if gone:
                if gone == 1:
                    del self._gone[key]
                else:
                    self._gone[key] = gone - 1
                continue
            value = self._unpack(self._d.pop(key))
            self._moved(key)
            return key, value


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
