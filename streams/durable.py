"""One way to open an SQLite file that must survive a crash (WAL, synchronous=FULL).

Shared by the embedded log, the scorer's state store and the trainer's
ledger, so every durable file in tapd has the same guarantees: a committed
transaction survives power loss, not only a process kill.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect_durable(path: Path | str, busy_timeout_s: float = 5.0) -> sqlite3.Connection:
    """An autocommit connection (explicit ``BEGIN``s) in WAL mode with full fsync."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(
        str(path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
    )
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    return conn
