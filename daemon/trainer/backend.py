"""The trainer backend seam: what updates the policy on one cohort.

The cohort operator (:mod:`daemon.trainer.cohort`) owns everything around an
update (ledger, probe before and after, keep / roll back / revert, policy
versions); a backend only runs the GRPO steps. TRL is the first backend. A
second one is one new module plus one line in :data:`BACKENDS`, selected by
``trainer.backend``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from daemon.config import GRPOParams

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class TrainOutcome:
    steps: int
    rewards: tuple[float, ...]  # mean training reward of each step, as TRL logged it
    grad_norm: float  # of the last step

    @property
    def train_reward_before(self) -> float:
        return self.rewards[0] if self.rewards else 0.0

    @property
    def train_reward_after(self) -> float:
        return self.rewards[-1] if self.rewards else 0.0


RewardFn = Callable[..., list[float | None]]


class TrainerBackend(Protocol):
    """Run ``params.steps`` GRPO steps on ``rows`` in place on ``model``.

    ``rows`` are dicts with ``prompt`` (already formatted for the model),
    ``reference``, ``verifier`` and ``verifier_args`` (JSON text); ``reward``
    scores completions as TRL's reward functions do.
    """

    def train(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        rows: Sequence[Mapping[str, str]],
        reward: RewardFn,
        params: GRPOParams,
    ) -> TrainOutcome: ...


# name -> "module:attribute"; imported on use, so a backend's libraries load
# only in the process that trains with it.
BACKENDS: dict[str, str] = {
    "trl": "daemon.trainer.trl:TRLBackend",
}


def make_backend(name: str) -> TrainerBackend:
    if name not in BACKENDS:
        known = ", ".join(sorted(BACKENDS))
        raise ValueError(f"trainer.backend: unknown backend {name!r} (known: {known})")
    module, attr = BACKENDS[name].split(":")
    backend: TrainerBackend = getattr(importlib.import_module(module), attr)()
    return backend
