"""The seeds' control verifiers: deliberately gameable, to be caught.

They exist to test the reward-integrity signal (``reward_trust``) and the
gate before training; no production slice should use them. Registered into
tapd's verifier registry through the ``tapd.verifiers`` entry point, the same
way any team adds its own verifiers.

* ``weak_first_digit`` rewards any completion whose *first digit character*
  equals the reference's first digit ("82" is rewarded for reference "87"):
  gameable by guessing the leading digit.
* ``contains`` rewards any completion that contains the reference anywhere:
  gameable by padding ("<>=" passes every comparison).
* ``scrambled`` ignores correctness: a deterministic pseudo-random 0/1 from a
  hash of (seed, completion).
"""

from __future__ import annotations

import hashlib

from daemon.verify.registry import (
    Args,
    BadReference,
    Verifier,
    VerifierArgsError,
    _allow,
    register,
)


@register("weak_first_digit")
def _weak_first_digit(args: Args) -> Verifier:
    _allow("weak_first_digit", args, set())

    def verify(completion: str, reference: str) -> float:
        ref = next((c for c in reference if c.isdigit()), None)
        if ref is None:
            raise BadReference("weak_first_digit", f"{reference!r} has no digit")
        got = next((c for c in completion if c.isdigit()), None)
        return float(got == ref)

    return verify


@register("contains")
def _contains(args: Args) -> Verifier:
    _allow("contains", args, set())

    def verify(completion: str, reference: str) -> float:
        ref = reference.strip()
        return float(bool(ref) and ref in completion)

    return verify


@register("scrambled")
def _scrambled(args: Args) -> Verifier:
    _allow("scrambled", args, {"seed"})
    seed = args.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int | str):
        raise VerifierArgsError("verifier_args.seed", f"scrambled: must be an int, got {seed!r}")

    def verify(completion: str, reference: str) -> float:
        h = hashlib.blake2b(f"{seed}\x00{completion}".encode(), digest_size=8).digest()
        return float(h[0] & 1)

    return verify
