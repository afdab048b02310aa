"""Reading a topic by position (kcat -C -p -o -e) on both transports: partitions,
start offsets, the last N, the end seen at the start; nothing created, nothing committed."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.config import TransportSettings
from daemon.runtime.logread import NoSuchTopic, extents, read
from streams.factory import open_transport


def _fill(settings: TransportSettings, topic: str, n: int) -> dict[int, list[bytes]]:
    transport = open_transport(settings)
    producer = transport.producer()
    for i in range(n):
        # Keys pin records to partitions in both transports.
        producer.send(topic, f"v{i}".encode(), key=f"k{i % 2}".encode())
    producer.flush()
    producer.close()
    transport.close()
    by_part: dict[int, list[bytes]] = {}
    for rec in read(settings, topic):
        by_part.setdefault(rec.partition, []).append(rec.value)
    return by_part


def test_positions(transport_settings: TransportSettings, topic: str) -> None:
    by_part = _fill(transport_settings, topic, 10)
    assert sorted(v for vs in by_part.values() for v in vs) == sorted(
        f"v{i}".encode() for i in range(10)
    )
    ext = extents(transport_settings, topic)
    assert set(ext) == {0, 1}
    for p, e in ext.items():
        assert e.end - e.begin == len(by_part.get(p, []))
    p = max(by_part, key=lambda k: len(by_part[k]))
    values = by_part[p]
    last2 = [r.value for r in read(transport_settings, topic, partitions=[p], last=2)]
    assert last2 == values[-2:]
    start = ext[p].begin + 1
    tail = list(read(transport_settings, topic, partitions=[p], offset=start))
    assert [r.value for r in tail] == values[1:] and tail[0].offset == start
    assert len(list(read(transport_settings, topic, limit=3))) == 3
    with pytest.raises(NoSuchTopic, match="no partition 7"):
        list(read(transport_settings, topic, partitions=[7]))


def test_a_missing_topic_or_log(tmp_path: Path) -> None:
    settings = TransportSettings(kind="embedded", embedded_path=tmp_path / "none.sqlite")
    assert extents(settings, "t") == {}
    with pytest.raises(NoSuchTopic):
        list(read(settings, "t"))
    assert not (tmp_path / "none.sqlite").exists()  # reading never creates a log
