"""What a verifier refuses: each a :class:`~streams.rejection.Rejection` (field + reason).

A verifier never raises on a *completion* (a malformed answer is simply
wrong); these are for what the *task* got wrong or what this host cannot do.
"""

from __future__ import annotations

from streams.rejection import Rejection


class VerifierError(Rejection):
    """A verifier that cannot be built or cannot judge a reference."""


class UnknownVerifier(VerifierError):
    def __init__(self, name: str, known: tuple[str, ...]) -> None:
        super().__init__("verifier", f"unknown verifier {name!r} (known: {', '.join(known)})")


class VerifierArgsError(VerifierError):
    """An argument from ``verifier_args`` that is malformed or over a configured cap."""


class BadReference(VerifierError):
    def __init__(self, verifier: str, reason: str) -> None:
        super().__init__("reference", f"{verifier}: {reason}")


class SandboxUnavailable(VerifierError):
    """This host cannot run code under the sandbox's guarantees: code is refused.

    The reason names the setting or kernel facility to fix; tapd never falls
    back to running code with weaker isolation.
    """

    def __init__(self, reason: str) -> None:
        super().__init__("verifier", f"code sandbox unavailable: {reason}")
