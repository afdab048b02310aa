"""Embedded-transport throughput against raw SQLite on the same disk, same run.

    .venv/bin/python -m bench.bench_embedded [--records 50000] [--batch 500]

Produce: ``send`` x batch then ``flush`` (one durable transaction), against
raw ``executemany`` inserts of the same rows in transactions of the same
size with the same pragmas (WAL, ``synchronous=FULL``). Consume: ``poll`` of
``batch`` records then ``commit``, against raw ``SELECT ... LIMIT batch``
pages plus an offset upsert. The ratio transport / raw is what the
transport's bookkeeping costs. Per-cohort scoring latency and LightGBM refit
time live in ``bench/bench_predictor.py`` and ``bench/bench_features.py``;
``python -m bench.report`` runs them all into ``docs/PERFORMANCE.md``.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
from pathlib import Path

from bench.common import Rate, production_trace, timed
from streams.embedded import EmbeddedTransport
from streams.schemas import encode
from streams.transport import next_offsets

TOPIC = "bench.traces"


def payloads(n: int) -> list[tuple[bytes, bytes]]:
    return [(f"tr-{i}".encode(), encode(production_trace(i, attempts=8))) for i in range(n)]


def raw_sqlite(path: Path, rows: list[tuple[bytes, bytes]], batch: int) -> tuple[Rate, Rate]:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(
        "CREATE TABLE log (partition INTEGER, offset INTEGER, key BLOB, value BLOB,"
        " ts_ms INTEGER, PRIMARY KEY (partition, offset)) WITHOUT ROWID"
    )
    conn.execute("CREATE TABLE offsets (grp TEXT PRIMARY KEY, next_offset INTEGER)")

    def produce() -> int:
        for start in range(0, len(rows), batch):
            conn.execute("BEGIN")
            conn.executemany(
                "INSERT INTO log VALUES (0, ?, ?, ?, 0)",
                [(start + j, k, v) for j, (k, v) in enumerate(rows[start : start + batch])],
            )
            conn.execute("COMMIT")
        return len(rows)

    def consume() -> int:
        pos = n = 0
        while True:
            got = conn.execute(
                "SELECT offset, key, value FROM log WHERE partition = 0 AND offset >= ?"
                " ORDER BY offset LIMIT ?",
                (pos, batch),
            ).fetchall()
            if not got:
                return n
            n += len(got)
            pos = got[-1][0] + 1
            conn.execute(
                "INSERT INTO offsets VALUES ('g', ?) ON CONFLICT (grp) DO UPDATE"
                " SET next_offset = excluded.next_offset",
                (pos,),
            )

    out = timed(produce), timed(consume)
    conn.close()
    return out


def transport(path: Path, rows: list[tuple[bytes, bytes]], batch: int) -> tuple[Rate, Rate]:
    t = EmbeddedTransport(path, partitions=1)
    prod = t.producer()

    def produce() -> int:
        for start in range(0, len(rows), batch):
            for k, v in rows[start : start + batch]:
                prod.send(TOPIC, v, key=k)
            prod.flush()
        return len(rows)

    cons = t.consumer([TOPIC], "bench")

    def consume() -> int:
        n = 0
        while n < len(rows):
            recs = cons.poll(timeout_s=1.0, max_records=batch)
            if not recs:
                raise RuntimeError(f"consumer stalled after {n} of {len(rows)} records")
            n += len(recs)
            cons.commit(next_offsets(recs))
        return n

    out = timed(produce), timed(consume)
    prod.close()
    cons.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=50_000)
    ap.add_argument("--batch", type=int, default=500, help="records per flush / per poll")
    args = ap.parse_args()
    rows = payloads(args.records)
    size = sum(len(v) for _, v in rows) / len(rows)
    print(f"{args.records:,} trace records of {size:,.0f} B, batches of {args.batch}")
    with tempfile.TemporaryDirectory(prefix="tapd-bench-") as d:
        raw_p, raw_c = raw_sqlite(Path(d) / "raw.sqlite", rows, args.batch)
        emb_p, emb_c = transport(Path(d) / "embedded.sqlite", rows, args.batch)
    for what, emb, raw in (("produce+flush", emb_p, raw_p), ("poll+commit", emb_c, raw_c)):
        print(
            f"{what:<14} embedded {emb.per_s:>10,.0f} rec/s   raw SQLite {raw.per_s:>10,.0f} rec/s"
            f"   ratio {emb.per_s / raw.per_s:.2f}"
        )


if __name__ == "__main__":
    main()
