"""The one error type for input that is refused: a field and a reason.

Every "this input cannot be used" error in tapd (a message against its
schema, a feature vector, a verifier's arguments, a threshold, a dispatch
item the trainer cannot fit) is a :class:`Rejection`, so every caller can
route it the same way: to the dead-letter topic, an HTTP 422, or one CLI
line, always naming ``field`` and ``reason``.
"""

from __future__ import annotations


class Rejection(ValueError):
    """Refused input; ``field`` is a dotted path (``attempts[0].reward``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
