"""The state store writes the scorer's id windows as journaled rows: what it loads
is what a whole snapshot would have held, in the same order."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from daemon.core.journal import MAX_CHANGES, Journaled, Window, section
from daemon.runtime.state import StateStore

LEARNED = section(("learned",), as_list=True)
DECIDED = section(("cohorts", "parts", "traces/0", "cohorts", "decided"))


def _skeleton() -> dict[str, Any]:
    return {"learned": [], "cohorts": {"parts": {"traces/0": {"cohorts": {"decided": {}}}}}}


def _whole(learned: Journaled[str, None], decided: Journaled[str, str | None]) -> dict[str, Any]:
    return {
        "learned": list(learned),
        "cohorts": {"parts": {"traces/0": {"cohorts": {"decided": dict(decided)}}}},
    }


def _mutate(rng: random.Random, d: Journaled[str, Any], value: Any, window: int) -> None:
    for _ in range(rng.randint(0, 30)):
        op = rng.random()
        if op < 0.5:
            d[f"id-{rng.randrange(200)}"] = value()  # new (at the end) or changed in place
        elif op < 0.65 and d:
            d.pop(rng.choice(list(d)))
        elif op < 0.75 and d:
            # Taken out and put back (a readmitted trace): it moves to the end.
            key = rng.choice(list(d))
            d.pop(key)
            d[key] = value()
        elif op < 0.85 and d:
            del d[rng.choice(list(d))]
        while len(d) > window:
            d.popitem(last=False)


def test_journaled_windows_load_as_whole_windows_in_order(tmp_path: Path) -> None:
    rng = random.Random(3)
    path = tmp_path / "state.sqlite"
    store = StateStore(path)
    learned: Journaled[str, None] = Journaled()
    decided: Journaled[str, str | None] = Journaled()
    for batch in range(300):
        _mutate(rng, learned, lambda: None, 60)
        _mutate(rng, decided, lambda: rng.choice([None, f"sha256:{rng.randrange(9)}"]), 80)
        store.save(_skeleton(), {}, [], journals={LEARNED: learned, DECIDED: decided})
        assert not learned.changes and not decided.changes
        loaded = store.load_snapshot()
        assert loaded == _whole(learned, decided)
        assert list(loaded["cohorts"]["parts"]["traces/0"]["cohorts"]["decided"].items()) == list(
            decided.items()
        )
        if batch % 50 == 49:
            # A restart: a new store, the windows restored as new objects (written whole).
            store.close()
            store = StateStore(path)
            snap = store.load_snapshot()
            assert snap is not None and snap == _whole(learned, decided)
            learned = Journaled((k, None) for k in snap["learned"])
            decided = Journaled(snap["cohorts"]["parts"]["traces/0"]["cohorts"]["decided"].items())
    store.close()


def test_a_failed_save_and_a_lost_partition_are_written_whole(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite")
    decided: Journaled[str, str | None] = Journaled([("a", "x"), ("b", None)])
    store.save(_skeleton(), {}, [], journals={DECIDED: decided})
    decided["c"] = "y"
    with pytest.raises(ValueError):
        # A snapshot that cannot be encoded: the transaction rolls back.
        store.save({**_skeleton(), "bad": float("nan")}, {}, [], journals={DECIDED: decided})
    assert decided.changes  # not drained: nothing was written
    decided.drained()  # even so (a caller that dropped them), the next save writes all
    store.save(_skeleton(), {}, [], journals={DECIDED: decided})
    snap = store.load_snapshot()
    assert snap is not None
    assert snap["cohorts"]["parts"]["traces/0"]["cohorts"]["decided"] == dict(decided)
    # The partition is gone from the scorer: its rows go too.
    store.save({"learned": [], "cohorts": {"parts": {}}}, {}, [], journals={})
    assert store.load_snapshot() == {"learned": [], "cohorts": {"parts": {}}}
    # A whole snapshot (no journals) stands alone.
    store.save(_whole(Journaled(), decided), {}, [])
    assert store.load_snapshot() == _whole(Journaled(), decided)
    store.close()


def test_too_many_changes_ask_for_a_full_write(tmp_path: Path) -> None:
    d: Journaled[str, None] = Journaled()
    for i in range(MAX_CHANGES + 1):
        d[str(i)] = None
    assert d.overflowed and not d.changes
    store = StateStore(tmp_path / "state.sqlite")
    store.save({"learned": []}, {}, [], journals={LEARNED: d})
    store.save({"learned": []}, {}, [], journals={LEARNED: d})
    snap = store.load_snapshot()
    assert snap is not None and snap["learned"] == list(d)
    with pytest.raises(NotImplementedError):
        d.move_to_end("1", last=False)
    store.close()


# --- issue 17: the id windows in less memory -------------------------------------------


def test_a_window_behaves_as_the_journaled_dict_it_replaces() -> None:
    """Any sequence of what the builder and the scorer do to their id windows (add,
    re-set, take out of order, put back, trim the oldest) leaves a Window with the
    items, the order and the changes a Journaled dict would have."""
    rng = random.Random(17)
    for _ in range(40):
        old: Journaled[str, str | None] = Journaled()
        new = Window()
        for _ in range(300):
            op = rng.random()
            key = f"id-{rng.randrange(60)}"
            value = rng.choice([None, f"sha256:{rng.getrandbits(64):016x}", "other", "sha256:ABC"])
            if op < 0.55:
                old[key] = value
                new[key] = value
            elif op < 0.7:
                assert new.pop(key, None) == old.pop(key, None)
            elif op < 0.75 and key in old:
                del old[key]
                del new[key]
            elif op < 0.95 and old:
                assert new.popitem(last=False) == old.popitem(last=False)
            else:
                old.drained()
                new.drained()
            assert list(new.items()) == list(old.items()) and len(new) == len(old)
            assert new.changes == old.changes and new.overflowed == old.overflowed
            assert all(new[k] == old[k] and k in new for k in old)
        assert dict(new) == dict(old) and list(new) == list(old)


def test_a_window_of_decided_ids_takes_under_two_thirds_of_the_journaled_dict() -> None:
    import tracemalloc

    n = 50_000
    ids = [f"tr-{i % 1000}-{i}" for i in range(n)]
    hexes = [f"{random.getrandbits(64):016x}" for _ in range(n)]

    def cost(make: Any) -> float:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        window = make()
        for k, h in zip(ids, hexes, strict=True):
            window[k] = "sha256:" + h  # a digest of its own, as each trace brings one
        window.drained()
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        return used / n

    assert cost(Window) < 2 / 3 * cost(Journaled)
