"""The transport's settings: which log, and how to reach it.

Owned by the streams layer (the transports read them); the service's
settings (:class:`daemon.config.TapdSettings`) nest them as ``transport``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TransportSettings(_Frozen):
    # A name in streams.factory.TRANSPORTS.
    kind: str = "embedded"
    # Transport-specific options a new transport reads without new fields here.
    options: dict[str, str] = Field(default_factory=dict)
    # embedded: one SQLite file holds every topic and the group offsets
    embedded_path: Path = Path("var/tapd-log.sqlite")
    embedded_partitions: int = Field(default=1, ge=1, le=64)
    # kafka: passed through to kafka-python
    bootstrap_servers: str = "localhost:9092"
    # "auto": learn the broker's protocol from ApiVersions (Kafka >= 0.10, tansu,
    # Redpanda, ...). Brokers older than 0.10 never answer that request: name
    # their version instead ("0.9").
    api_version: str = Field(default="auto", pattern=r"^(auto|\d+\.\d+(\.\d+)?)$")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_check_hostname: bool = True
    client_id: str = "tapd"
    request_timeout_ms: int = Field(default=30_000, ge=1_000)
    max_poll_interval_ms: int = Field(default=300_000, ge=10_000)
    session_timeout_ms: int = Field(default=10_000, ge=6_000)
    metadata_max_age_ms: int = Field(default=5_000, ge=1_000)

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        from streams.factory import TRANSPORTS

        if v not in TRANSPORTS:
            raise ValueError(f"unknown transport {v!r} (known: {', '.join(sorted(TRANSPORTS))})")
        return v
