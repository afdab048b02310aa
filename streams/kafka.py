"""The Kafka transport, on kafka-python 3.0.x.

Tested against two real brokers: Apache Kafka 0.9.0.1 (no ApiVersions, no
record headers, no idempotent producer: its version is named in the settings,
``api_version="0.9"``) and tansu (the modern protocol, version learnt from
ApiVersions). Topics are auto-created on first use or created by the
deployment.

* Capabilities come from the broker's protocol version
  (:class:`BrokerCapabilities`), never from guesses: the idempotent producer
  is switched on where the broker supports it (>= 0.11) and off below.
* Producer: ``acks='all'``, retries, one request in flight per connection
  (retries never reorder); idempotent where supported, so a retried batch is
  never written twice; ``flush`` raises if any record was not acked.
* Consumer: one consumer group, ``enable_auto_commit=False``; commits are
  explicit next offsets. ``pause`` pauses every assigned partition and stays
  in force across rebalances (kafka-python forgets pauses on a new
  assignment, so the rebalance listener re-applies them). A KafkaConsumer is
  not thread safe: one owner thread.
* Lag comes from the high watermark of the consumer's own fetches, not from
  ListOffsets: some Kafka-API brokers (tansu 0.6) answer ListOffsets(latest)
  wrongly after batched produce, while the fetch high watermark is what the
  broker will actually serve.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer as _KConsumer
from kafka import KafkaProducer as _KProducer
from kafka import TopicPartition as _KTP
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError, KafkaTimeoutError
from kafka.structs import OffsetAndMetadata

from streams.settings import TransportSettings
from streams.transport import (
    AssignHook,
    Consumer,
    Producer,
    Record,
    RevokeHook,
    TopicPartition,
)

log = logging.getLogger(__name__)

_SECRET_KEYS = frozenset({"sasl_plain_password", "ssl_password"})


class ClientConfig(dict[str, Any]):
    """kafka-python keyword arguments; the password is masked in repr/str."""

    def __repr__(self) -> str:
        shown = {k: ("**********" if k in _SECRET_KEYS and v else v) for k, v in self.items()}
        return f"ClientConfig({shown!r})"

    __str__ = __repr__


def parse_api_version(text: str) -> tuple[int, ...] | None:
    """``"auto"`` -> None (ask the broker), ``"0.9"`` -> ``(0, 9)``."""
    return None if text == "auto" else tuple(int(p) for p in text.split("."))


@dataclass(frozen=True)
class BrokerCapabilities:
    """What the broker's protocol version allows, decided once per transport."""

    api_version: tuple[int, ...]

    @property
    def idempotent_producer(self) -> bool:
        # InitProducerId and producer sequence numbers arrived in 0.11 (KIP-98).
        return self.api_version >= (0, 11)

    @property
    def record_headers(self) -> bool:
        return self.api_version >= (0, 11)

    @property
    def separate_poll_interval(self) -> bool:
        # Before 0.10.1 the session timeout also bounds the time between polls
        # (KIP-62) and kafka-python refuses two different values.
        return self.api_version >= (0, 10, 1)


def client_config(settings: TransportSettings) -> ClientConfig:
    """The connection and security settings every client (producer, consumer,
    probe) shares, as kafka-python keyword arguments."""
    cfg = ClientConfig(
        bootstrap_servers=[s.strip() for s in settings.bootstrap_servers.split(",") if s.strip()],
        client_id=settings.client_id,
        security_protocol=settings.security_protocol,
        request_timeout_ms=settings.request_timeout_ms,
        # The default backoff grows to 30 s: after a broker restart clients
        # would sit idle that long before reconnecting.
        reconnect_backoff_max_ms=2_000,
        # A consumer subscribed to several topics is assigned only those that
        # exist when it joins; one created later (the lift topic, on the
        # trainer's first publish) is seen at the next metadata refresh,
        # 5 minutes by default.
        metadata_max_age_ms=settings.metadata_max_age_ms,
    )
    api_version = parse_api_version(settings.api_version)
    if api_version is not None:
        cfg["api_version"] = api_version
    if settings.security_protocol.startswith("SASL_"):
        cfg["sasl_mechanism"] = settings.sasl_mechanism or "PLAIN"
        cfg["sasl_plain_username"] = settings.sasl_plain_username
        if settings.sasl_plain_password is not None:
            cfg["sasl_plain_password"] = settings.sasl_plain_password.get_secret_value()
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        cfg["ssl_check_hostname"] = settings.ssl_check_hostname
        for key in ("ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            value = getattr(settings, key)
            if value is not None:
                cfg[key] = str(value)
    return cfg


def _tp(ktp: Any) -> TopicPartition:
    return TopicPartition(ktp.topic, ktp.partition)


class KafkaProducer:
    def __init__(self, config: Mapping[str, Any], capabilities: BrokerCapabilities) -> None:
        self.idempotent = capabilities.idempotent_producer
        self._p = _KProducer(
            **config,
            # Set either way: kafka-python 3 defaults to on and only warns
            # when the broker is too old for it.
            enable_idempotence=self.idempotent,
            acks="all",
            retries=10,
            retry_backoff_ms=200,
            # One request in flight: a retried batch cannot overtake the next.
            max_in_flight_requests_per_connection=1,
            linger_ms=5,
            # Our own limit is 700 kB per message (streams.schemas), the 0.9
            # broker's 1,000,012 bytes.
            max_request_size=1_000_000,
        )
        self._pending: list[Any] = []

    def send(
        self, topic: str, value: bytes, key: bytes | None = None, partition: int | None = None
    ) -> None:
        # The first send to a new topic waits for its auto-creation
        # (max_block_ms); kafka-python refreshes metadata until it has a leader.
        self._pending.append(self._p.send(topic, value=value, key=key, partition=partition))

    def flush(self, timeout_s: float | None = None) -> None:
        self._p.flush(timeout=timeout_s)
        pending, self._pending = self._pending, []
        failed = [f for f in pending if f.failed()]
        if failed:
            raise KafkaError(
                f"{len(failed)} of {len(pending)} records were not acknowledged: "
                f"{failed[0].exception!r}"
            )
        if any(not f.is_done for f in pending):
            raise KafkaTimeoutError(f"flush did not complete within {timeout_s}s")

    def close(self) -> None:
        self._p.close()


class _Listener(ConsumerRebalanceListener):
    def __init__(self, owner: KafkaConsumer) -> None:
        self._owner = owner

    def on_partitions_revoked(self, revoked: Any) -> None:
        if self._owner.on_revoked is not None and revoked:
            self._owner.on_revoked([_tp(t) for t in revoked])

    def on_partitions_assigned(self, assigned: Any) -> None:
        if self._owner._paused and assigned:
            self._owner._c.pause(*assigned)
        if self._owner.on_assigned is not None and assigned:
            # seek() here sets where each partition resumes; kafka-python
            # fetches the committed offset only for partitions left unset.
            self._owner.on_assigned([_tp(t) for t in assigned])


def _commit_done(offsets: Mapping[Any, Any], result: Any) -> None:
    """An asynchronous commit's outcome: a failure is logged (the caller keeps the
    offsets elsewhere; the next commit carries newer ones)."""
    if isinstance(result, Exception):
        log.warning("kafka commit failed: %s (%d partitions)", type(result).__name__, len(offsets))


class KafkaConsumer:
    def __init__(
        self,
        config: Mapping[str, Any],
        capabilities: BrokerCapabilities,
        topics: Sequence[str],
        group: str,
        *,
        from_beginning: bool = True,
        on_revoked: RevokeHook | None = None,
        on_assigned: AssignHook | None = None,
        session_timeout_ms: int = 10_000,
        max_poll_interval_ms: int = 300_000,
        max_poll_records: int = 500,
    ) -> None:
        self.on_revoked = on_revoked
        self.on_assigned = on_assigned
        self._paused = False
        timeouts: dict[str, int] = {"session_timeout_ms": session_timeout_ms}
        if capabilities.separate_poll_interval:
            timeouts["max_poll_interval_ms"] = max_poll_interval_ms
        self._c = _KConsumer(
            **config,
            **timeouts,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest" if from_beginning else "latest",
            max_poll_records=max_poll_records,
            heartbeat_interval_ms=max(session_timeout_ms // 3, 100),
        )
        self._c.subscribe(topics=list(topics), listener=_Listener(self))

    def poll(self, timeout_s: float, max_records: int) -> list[Record]:
        now_ms = int(time.time() * 1000)
        batches = self._c.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out: list[Record] = []
        for ktp, records in batches.items():
            for r in records:
                # Message format v0 (the 0.9 broker) has no timestamp: use
                # the time we received it.
                ts = r.timestamp if r.timestamp is not None and r.timestamp >= 0 else now_ms
                # A tombstone (compacted topics) has no value: empty bytes.
                value = r.value if r.value is not None else b""
                out.append(Record(ktp.topic, ktp.partition, r.offset, r.key, value, int(ts)))
        return out

    def commit(self, offsets: Mapping[TopicPartition, int], wait: bool = True) -> None:
        if not offsets:
            return
        kafka_offsets = {
            _KTP(tp.topic, tp.partition): OffsetAndMetadata(int(o), "", -1)
            for tp, o in offsets.items()
        }
        if wait:
            self._c.commit(kafka_offsets)
        else:
            # Completed by the client's network thread; the callback runs in a
            # later poll().
            self._c.commit_async(kafka_offsets, callback=_commit_done)

    def committed(self, tp: TopicPartition) -> int | None:
        value = self._c.committed(_KTP(tp.topic, tp.partition))
        return None if value is None else int(value)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        ktp = _KTP(tp.topic, tp.partition)
        if ktp not in self._c.assignment():
            raise ValueError(f"seek: {tp} is not assigned to this consumer")
        self._c.seek(ktp, int(offset))

    def pause(self) -> None:
        self._paused = True
        assigned = self._c.assignment()
        if assigned:
            self._c.pause(*assigned)

    def resume(self) -> None:
        self._paused = False
        paused = self._c.paused()
        if paused:
            self._c.resume(*paused)

    def paused(self) -> bool:
        return self._paused

    def lag(self) -> dict[TopicPartition, int]:
        """Records not yet committed by the group (or not yet read, before
        its first commit), per assigned partition.

        The end of each partition is the high watermark of our last fetch
        from it; ListOffsets is asked only for a partition not fetched yet.
        A paused partition keeps the watermark of its last fetch."""
        assigned = list(self._c.assignment())
        if not assigned:
            return {}
        ends: dict[Any, int | None] = {ktp: self._c.highwater(ktp) for ktp in assigned}
        unfetched = [ktp for ktp, end in ends.items() if end is None]
        if unfetched:
            ends.update(self._c.end_offsets(unfetched))
        out: dict[TopicPartition, int] = {}
        for ktp in assigned:
            done = self._c.committed(ktp)
            if done is None:
                done = self._c.position(ktp)
            out[_tp(ktp)] = max(int(ends[ktp] or 0) - int(done or 0), 0)
        return out

    def close(self) -> None:
        # close() does not run on_partitions_revoked: the owner commits first.
        self._c.close(autocommit=False)


class KafkaTransport:
    @classmethod
    def from_settings(
        cls, settings: TransportSettings, max_poll_records: int = 500
    ) -> KafkaTransport:
        return cls(settings, max_poll_records=max_poll_records)

    def __init__(self, settings: TransportSettings, max_poll_records: int = 500) -> None:
        self.settings = settings
        self._config = client_config(settings)
        self._max_poll_records = max_poll_records
        self._probe: _KConsumer | None = None
        self._reader: _KConsumer | None = None
        self._meta: _KProducer | None = None

    def _client_config(self) -> Mapping[str, Any]:
        """The shared config plus the broker's API version, probed once here
        rather than by every client (and needed to pick capabilities)."""
        if "api_version" not in self._config:
            probe = self._probe_client(self.settings.request_timeout_ms)
            self._config["api_version"] = tuple(probe.config["api_version"])
        return self._config

    @property
    def capabilities(self) -> BrokerCapabilities:
        """What this broker supports (asks it for its version the first time)."""
        return BrokerCapabilities(tuple(self._client_config()["api_version"]))

    def _probe_client(self, bootstrap_timeout_ms: int) -> _KConsumer:
        """A group-less consumer used for the version probe and for ping.
        Without a configured version its construction bootstraps (an
        ApiVersions and a metadata round trip) and raises if that fails."""
        if self._probe is None:
            self._probe = _KConsumer(**self._config, bootstrap_timeout_ms=bootstrap_timeout_ms)
        return self._probe

    def producer(self) -> Producer:
        return KafkaProducer(self._client_config(), self.capabilities)

    def consumer(
        self,
        topics: Sequence[str],
        group: str,
        *,
        from_beginning: bool = True,
        on_revoked: RevokeHook | None = None,
        on_assigned: AssignHook | None = None,
    ) -> Consumer:
        # Every topic has partitions before the group is joined: a member that
        # joins while a topic is still being auto-created can be assigned none
        # of it and (seen with kafka-python 3 on Kafka 0.9) not rejoin when it
        # appears, so the consumer waits forever on a topic that has records.
        for topic in topics:
            self.partitions(topic)
        return KafkaConsumer(
            self._client_config(),
            self.capabilities,
            topics,
            group,
            from_beginning=from_beginning,
            on_revoked=on_revoked,
            on_assigned=on_assigned,
            session_timeout_ms=self.settings.session_timeout_ms,
            max_poll_interval_ms=self.settings.max_poll_interval_ms,
            max_poll_records=self._max_poll_records,
        )

    def _read_client(self) -> _KConsumer:
        """One group-less consumer for partition reads and offset lookups (the
        owner's thread only, like every KafkaConsumer)."""
        if self._reader is None:
            self._reader = _KConsumer(
                **self._client_config(),
                group_id=None,
                enable_auto_commit=False,
                # A start below the log's first offset (retention) reads from
                # that first offset, never silently from the end.
                auto_offset_reset="earliest",
                max_poll_records=self._max_poll_records,
                # A read at the end of a partition waits this long, not 500 ms.
                fetch_max_wait_ms=20,
            )
        return self._reader

    def partitions(self, topic: str, timeout_s: float = 30.0) -> int:
        # A producer's metadata wait names the topic (public API in kafka-python
        # 2.x and 3.x alike): a missing topic is auto-created where the broker
        # allows, and its partitions show once it has a leader. One producer is
        # kept for these lookups (closed with the transport).
        if self._meta is None:
            self._meta = _KProducer(
                **self._client_config(),
                enable_idempotence=self.capabilities.idempotent_producer,
                max_block_ms=int(timeout_s * 1000),
            )
        try:
            found = self._meta.partitions_for(topic)
        except KafkaTimeoutError:
            found = None
        if not found:
            raise KafkaTimeoutError(f"topic {topic!r}: no partitions after {timeout_s}s")
        return len(found)

    def end_offsets(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The high watermark of each partition, from a fetch (ListOffsets alone
        is wrong on some brokers after a batched produce: tansu answers the
        last batch's base + 1)."""
        if not tps:
            return {}
        reader = self._read_client()
        ktps = [_KTP(tp.topic, tp.partition) for tp in tps]
        listed = {k: int(v) for k, v in reader.end_offsets(ktps).items()}
        reader.unsubscribe()  # a fresh assignment: no watermark from an earlier fetch
        reader.assign(ktps)
        for k in ktps:
            reader.seek(k, listed[k])
        deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
        while True:
            marks = {k: reader.highwater(k) for k in ktps}
            if all(m is not None for m in marks.values()) or time.monotonic() > deadline:
                break
            reader.poll(timeout_ms=100, max_records=1)  # only the watermark is wanted
        return {_tp(k): max(int(marks[k] or 0), listed[k]) for k in ktps}

    def read(self, tp: TopicPartition, start: int, end: int) -> list[Record]:
        start = max(0, start)
        if end <= start:
            return []
        reader = self._read_client()
        ktp = _KTP(tp.topic, tp.partition)
        reader.unsubscribe()
        reader.assign([ktp])
        reader.seek(ktp, start)
        out: list[Record] = []
        deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
        while reader.position(ktp) < end:
            batch = reader.poll(timeout_ms=500, max_records=self._max_poll_records)
            if not batch:
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(f"read {tp} [{start}, {end}): stalled")
                continue
            deadline = time.monotonic() + self.settings.request_timeout_ms / 1000
            for r in batch.get(ktp, ()):
                if r.offset < end:
                    value = r.value if r.value is not None else b""
                    ts = r.timestamp if r.timestamp is not None and r.timestamp >= 0 else 0
                    out.append(Record(tp.topic, tp.partition, r.offset, r.key, value, int(ts)))
        return out

    def ping(self, timeout_s: float = 2.0) -> bool:
        """A fresh bootstrap (connect and a metadata round trip) to the cluster."""
        timeout_ms = int(timeout_s * 1000)
        try:
            probe = self._probe_client(timeout_ms)
            probe.bootstrap(timeout_ms=timeout_ms, refresh=True)
            return True
        except (KafkaError, OSError) as e:
            log.warning("kafka ping failed: %s", type(e).__name__)
            return False

    def close(self) -> None:
        if self._meta is not None:
            self._meta.close()
            self._meta = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._probe is not None:
            self._probe.close()
            self._probe = None

    def __repr__(self) -> str:
        return f"KafkaTransport({self._config!r})"
