"""Choose the transport the settings name (``transport.kind``)."""

from __future__ import annotations

from streams.settings import TransportSettings
from streams.transport import Transport


def open_transport(settings: TransportSettings, max_poll_records: int = 500) -> Transport:
    """The embedded SQLite log or Kafka; imported lazily so that the embedded
    path never loads kafka-python."""
    if settings.kind == "embedded":
        from streams.embedded import EmbeddedTransport

        return EmbeddedTransport(settings.embedded_path, settings.embedded_partitions)
    from streams.kafka import KafkaTransport

    return KafkaTransport(settings, max_poll_records=max_poll_records)
