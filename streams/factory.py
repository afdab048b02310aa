"""Choose the transport the settings name (``transport.kind``).

A transport is a module with a class whose ``from_settings(settings,
max_poll_records)`` returns a :class:`~streams.transport.Transport`; adding
one is that module plus one line in :data:`streams.settings.TRANSPORTS`. Imported lazily, so
the embedded path never loads kafka-python.
"""

from __future__ import annotations

import importlib

from streams.settings import TRANSPORTS, TransportSettings
from streams.transport import Transport


def open_transport(settings: TransportSettings, max_poll_records: int = 500) -> Transport:
    module, attr = TRANSPORTS[settings.kind].split(":")
    cls = getattr(importlib.import_module(module), attr)
    transport: Transport = cls.from_settings(settings, max_poll_records)
    return transport
