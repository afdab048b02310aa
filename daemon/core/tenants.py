"""Which tenants get a metric label of their own: a small, bounded chooser.

Traces carry a ``tenant`` (:class:`streams.schemas.Trace`), a free string:
used as a Prometheus label as is, one noisy producer could create a series
per request. :class:`TenantLabels` bounds the label values to at most
``max_tenants`` tenants plus two reserved words:

``other``
    every tenant beyond the first ``max_tenants``;
``unknown``
    a record whose tenant cannot be read (it does not decode as a trace,
    and its bytes do not name a usable tenant either).

Rule: **first seen, first labelled.** The tenants pinned in the settings
(``metrics.tenants``) hold their labels from the start; the remaining
slots go to the first distinct tenants this process sees, in the order it
sees them, and a label once given is never taken back. So a series never
changes meaning while the process lives, and the state is at most
``max_tenants`` strings (each at most ``MAX_ID_CHARS``), no counts. A top-N
by volume would need a count per tenant ever seen (unbounded) or a sketch,
and would move a tenant between its own series and ``other`` as traffic
shifts; first-seen does neither.

Restarts and replicas: the chooser is not persisted. A restarted scorer
starts empty again (pinned tenants first) and hands the free slots to the
first tenants it reads after the restart, so a tenant that had its own
label before may count under ``other`` after it, and the other way round;
each replica chooses on its own, too. Counters start from zero at a
restart anyway, and ``sum`` over ``tenant`` is always exact; pin the
tenants whose series must be the same on every replica and across
restarts.

A real tenant named ``other`` or ``unknown`` shares that label (it takes
no slot). Not thread-safe: the scorer's loop is its only caller.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streams.schemas import MAX_ID_CHARS, MAX_MESSAGE_BYTES, Trace

OTHER = "other"
UNKNOWN = "unknown"
RESERVED = (OTHER, UNKNOWN)
DEFAULT_MAX_TENANTS = 20
# The tenant of a trace that does not name one.
DEFAULT_TENANT: str = Trace.model_fields["tenant"].default


class TenantLabels:
    """Maps tenants to at most ``max_tenants`` label values, plus ``other`` and ``unknown``."""

    def __init__(self, max_tenants: int = DEFAULT_MAX_TENANTS, pinned: Iterable[str] = ()) -> None:
        if max_tenants < 0:
            raise ValueError(f"max_tenants must be >= 0, got {max_tenants}")
        own = tuple(dict.fromkeys(t for t in pinned if t not in RESERVED))
        if len(own) > max_tenants:
            raise ValueError(f"{len(own)} pinned tenants, more than max_tenants ({max_tenants})")
        self.max_tenants = max_tenants
        self.pinned = own
        self._labelled: dict[str, None] = dict.fromkeys(own)  # insertion-ordered set

    def label(self, tenant: str) -> str:
        """The label value for ``tenant``; the first ``max_tenants`` distinct ones keep theirs."""
        if tenant in self._labelled or tenant in RESERVED:
            return tenant
        if len(self._labelled) < self.max_tenants:
            self._labelled[tenant] = None
            return tenant
        return OTHER

    @property
    def tenants(self) -> tuple[str, ...]:
        """The tenants with a label of their own, pinned first, then in the order seen."""
        return tuple(self._labelled)

    def values(self) -> tuple[str, ...]:
        """Every label value in use: the tenants', then ``other`` and ``unknown``."""
        return (*self._labelled, *RESERVED)

    def __len__(self) -> int:
        return len(self._labelled)


class _TenantOnly(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    tenant: str = Field(default=DEFAULT_TENANT, min_length=1, max_length=MAX_ID_CHARS)


def tenant_of_record(raw: bytes) -> str:
    """The tenant a trace record's bytes name, for one that did not decode as a trace.

    Best effort, for the per-tenant dead-letter count: a JSON object with a
    valid ``tenant`` (or none: the schema's default) is that tenant's, even
    if another field is wrong; anything else (not JSON, not an object, over
    the size limit, a tenant that is not a valid name) is ``UNKNOWN``.
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        return UNKNOWN
    try:
        return _TenantOnly.model_validate_json(raw, strict=True).tenant
    except (ValidationError, ValueError, RecursionError):
        return UNKNOWN


def tenant_counts(tenants: Iterable[str]) -> tuple[tuple[str, int], ...]:
    """``(tenant, count)`` pairs in first-seen order (an event's bounded summary)."""
    return tuple(Counter(tenants).items())
