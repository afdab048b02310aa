"""Train the policy on one dispatched cohort with GRPO and measure the lift.

The data flow of one cohort::

    Dispatch ──► rows (prompt, reference, verifier) ──► GRPO steps (TRL)
        ──► probe before/after ──► keep, roll back or revert ──► LiftResult

The cohort's own verifier is the reward: a scrambled or gameable verifier
trains on a bad reward, and the probe (judged by trusted verifiers) shows it.

:class:`CohortTrainer` is the stateful operator (``on_dispatch``); its durable
state is a :class:`Ledger` (SQLite) that records, in one transaction, every
trained cohort's :class:`~streams.schemas.LiftResult` and the policy version
it produced. The ledger is the source of truth: a redelivered dispatch gets
its stored result back instead of a second update, and a restart loads the
checkpoint the ledger names, never an orphan written just before a crash.

Modes: ``continual`` keeps the update (a checkpoint per policy version,
rolled back when probe NLL worsens past ``rollback_nll_worsening``);
``probe_revert`` restores the exact pre-update weights after measuring.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.config import GRPOParams
from daemon.policy.store import PolicyStore, restore, snapshot, version_name
from daemon.trainer import plasticity
from daemon.trainer.backend import TrainerBackend, make_backend
from daemon.trainer.probe import (
    DEFAULT_FOOTHOLD_PROBABILITY,
    PartLift,
    Probe,
    ProbeReport,
    PromptFormat,
    Verifier,
    VerifierLookup,
    part_lift,
    probe_parts,
)
from streams.durable import connect_durable
from streams.probes import cohort_target
from streams.rejection import Rejection
from streams.schemas import LIFT_SCHEMA, Dispatch, LiftResult, Plasticity

Mode = Literal["continual", "probe_revert"]
StateDict = dict[str, torch.Tensor]


def cohort_seed(base: int, cohort_id: str) -> int:
    """A per-cohort seed: deterministic, yet different cohorts sample differently."""
    h = int.from_bytes(hashlib.sha256(f"{base}:{cohort_id}".encode()).digest()[:4], "big")
    return h % (2**31 - 1)


def cohort_rows(
    dispatch: Dispatch, tok: PreTrainedTokenizerBase, format_prompt: PromptFormat
) -> list[dict[str, str]]:
    """The GRPO dataset: one row per prompt; verifier args travel as JSON text."""
    return [
        {
            "prompt": format_prompt(tok, it.prompt),
            "reference": it.reference,
            "verifier": it.verifier,
            # A datasets column must have one type; argument dicts differ per verifier.
            "verifier_args": json.dumps(it.verifier_args, sort_keys=True),
        }
        for it in dispatch.items
    ]


class ItemRejected(Rejection):
    """An item the trainer cannot train on; ``field`` names it (``items[i].prompt``)."""


def context_length(model: PreTrainedModel) -> int | None:
    """The model's context in tokens (absolute positions), if it has a fixed one."""
    for name in ("n_positions", "max_position_embeddings"):
        n = getattr(model.config, name, None)
        if isinstance(n, int) and n > 0:
            return n
    return None


def check_fits(
    rows: Sequence[Mapping[str, str]],
    tok: PreTrainedTokenizerBase,
    context: int | None,
    max_completion_length: int,
) -> None:
    """Reject a cohort whose prompt plus completion budget overflows the context.

    Rejected rather than left-truncated: a truncated arithmetic prompt is a
    different task with the old reference, i.e. a wrong reward. Checked before
    the first GRPO step, because past the context a position embedding lookup
    fails mid-step (``IndexError: index out of range in self``).
    """
    if context is None:
        return
    for i, row in enumerate(rows):
        n = len(tok(row["prompt"])["input_ids"])
        if n + max_completion_length > context:
            raise ItemRejected(
                f"items[{i}].prompt",
                f"{n} prompt tokens + max_completion_length {max_completion_length} "
                f"exceed the policy's context of {context} tokens",
            )


class CohortReward:
    """TRL reward function: each completion scored by its row's verifier."""

    __name__ = "cohort_verifier"  # TRL logs rewards under the function's name

    def __init__(self, verifiers: VerifierLookup) -> None:
        self._lookup = verifiers
        self._cache: dict[tuple[str, str], Verifier] = {}

    def verifier(self, name: str, args_json: str) -> Verifier:
        key = (name, args_json)
        if key not in self._cache:
            self._cache[key] = self._lookup(name, json.loads(args_json))
        return self._cache[key]

    def __call__(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        reference: Sequence[str],
        verifier: Sequence[str],
        verifier_args: Sequence[str],
        **_: Any,
    ) -> list[float | None]:
        return [
            float(self.verifier(v, a)(c, r))
            for c, r, v, a in zip(completions, reference, verifier, verifier_args, strict=True)
        ]


def _lift_json(part: PartLift | None) -> dict[str, float] | None:
    if part is None:
        return None
    return {
        "items": part.items,
        "tokens": part.tokens,
        "nll_before": part.nll_before,
        "nll_after": part.nll_after,
        "nll_lift": part.nll_lift,
        "acc_before": part.acc_before,
        "acc_after": part.acc_after,
        "acc_lift": part.acc_lift,
    }


def same_weights(a: StateDict, b: StateDict) -> bool:
    """Bit-identical (not merely close)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Ledger:
    """Durable record of trained cohorts and policy versions (one SQLite file).

    A cohort's result and the version its update produced are written in one
    transaction, *before* the result is published.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = connect_durable(path)
        self._db.executescript(
            """
            CREATE TABLE IF NOT EXISTS lifts (cohort_id TEXT PRIMARY KEY, result TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS versions (
                n INTEGER PRIMARY KEY, checkpoint TEXT NOT NULL, cohort_id TEXT NOT NULL);
            """
        )

    def result(self, cohort_id: str) -> LiftResult | None:
        row = self._db.execute(
            "SELECT result FROM lifts WHERE cohort_id = ?", (cohort_id,)
        ).fetchone()
        return LiftResult.model_validate_json(row[0]) if row else None

    def current(self) -> tuple[int, Path] | None:
        row = self._db.execute(
            "SELECT n, checkpoint FROM versions ORDER BY n DESC LIMIT 1"
        ).fetchone()
        return (int(row[0]), Path(row[1])) if row else None

    def record(self, result: LiftResult, version: tuple[int, Path] | None = None) -> None:
        body = result.model_dump_json(by_alias=True)
        with self._db:
            self._db.execute("BEGIN")
            self._db.execute(
                "INSERT OR REPLACE INTO lifts (cohort_id, result) VALUES (?, ?)",
                (result.cohort_id, body),
            )
            if version is not None:
                self._db.execute(
                    "INSERT OR REPLACE INTO versions (n, checkpoint, cohort_id) VALUES (?, ?, ?)",
                    (version[0], str(version[1]), result.cohort_id),
                )

    def trained(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM lifts").fetchone()[0])

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True)
class Handled:
    """What :meth:`CohortTrainer.on_dispatch` did with one dispatch."""

    result: LiftResult
    duplicate: bool  # already trained: the stored result, no update


class CohortTrainer:
    """Train on one cohort at a time; remember what was trained."""

    def __init__(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        probe: Probe,
        verifiers: VerifierLookup,
        *,
        params: GRPOParams | None = None,
        mode: Mode = "continual",
        rollback_nll_worsening: float = 0.25,
        state_dir: Path,
        trainer_id: str = "tapd-trainer",
        format_prompt: PromptFormat | None = None,
        backend: TrainerBackend | None = None,
        policies: PolicyStore | None = None,
        foothold_probability: float = DEFAULT_FOOTHOLD_PROBABILITY,
    ) -> None:
        if not 0.0 < foothold_probability < 1.0:
            raise ValueError(f"foothold_probability: must be in (0, 1), got {foothold_probability}")
        self.foothold_probability = foothold_probability
        self.model = model
        self.backend = backend or make_backend("trl")
        self.tok = tok
        self.probe = probe
        self.reward = CohortReward(verifiers)
        self.params = params or GRPOParams()
        self.mode: Mode = mode
        self.rollback_nll_worsening = rollback_nll_worsening
        self.trainer_id = trainer_id
        self.format_prompt = format_prompt or probe.format_prompt
        self.state_dir = state_dir
        self.policies = policies or PolicyStore(state_dir / "checkpoints")
        self.ledger = Ledger(state_dir / "ledger.sqlite")
        current = self.ledger.current()
        if current is None:
            self.version = 0
        else:
            # Resume from the version the ledger names (a newer orphan file
            # from a crash before its ledger write is ignored and overwritten).
            self.version = current[0]
            restore(self.model, torch.load(current[1], map_location="cpu", weights_only=True))
        self.model.eval()
        self._probe_before: ProbeReport | None = None
        # The probe before and after the last trained cohort, item by item:
        # for analyses that split the probe further than the lift message does.
        self.last_measures: tuple[ProbeReport, ProbeReport] | None = None

    @property
    def policy_version(self) -> str:
        return version_name(self.version)

    def checkpoint_path(self, n: int) -> Path:
        return self.policies.path(n)

    def measure(self) -> ProbeReport:
        """The probe on the current weights (cached until the weights change)."""
        if self._probe_before is None:
            self._probe_before = self.probe.measure(self.model, self.tok)
        return self._probe_before

    def check(self, dispatch: Dispatch) -> list[dict[str, str]]:
        """The cohort's GRPO rows, or :class:`ItemRejected` naming the item that cannot fit."""
        rows = cohort_rows(dispatch, self.tok, self.format_prompt)
        check_fits(rows, self.tok, context_length(self.model), self.params.max_completion_length)
        return rows

    def target_of(self, dispatch: Dispatch) -> str | None:
        """The probe target the cohort's lift is measured on (see :func:`cohort_target`)."""
        return cohort_target(dispatch.subject, dispatch.target, self.probe.targets)

    def on_dispatch(self, dispatch: Dispatch, now: float) -> Handled:
        stored = self.ledger.result(dispatch.cohort_id)
        if stored is not None:
            return Handled(stored, duplicate=True)
        t0 = time.perf_counter()
        rows = self.check(dispatch)
        before = self.measure()
        weights_before = snapshot(self.model)
        version_before = self.policy_version
        params = self.params.replace(seed=cohort_seed(self.params.seed, dispatch.cohort_id))
        outcome = self.backend.train(self.model, self.tok, rows, self.reward, params)
        after = self.probe.measure(self.model, self.tok)
        self.last_measures = (before, after)
        w_norm = plasticity.weight_norm(self.model.parameters())

        rolled_back = False
        new_version: tuple[int, Path] | None = None
        if self.mode == "probe_revert":
            restore(self.model, weights_before)
        elif after.nll - before.nll > self.rollback_nll_worsening:
            restore(self.model, weights_before)
            rolled_back = True
        else:
            n = self.version + 1
            path = self.policies.save(n, snapshot(self.model))
            new_version = (n, path)

        target = self.target_of(dispatch)
        parts = probe_parts(self.probe.items, before, target, self.foothold_probability)

        result = LiftResult.model_validate(
            {
                "schema": LIFT_SCHEMA,
                "cohort_id": dispatch.cohort_id,
                "ts": now,
                "trainer_id": self.trainer_id,
                "mode": self.mode,
                "feature_schema": dispatch.feature_schema,
                "features": dispatch.features,
                "model_version": dispatch.model_version,
                "predicted_lift": dispatch.predicted_lift,
                "selection": dispatch.selection,
                "nll_before": before.nll,
                "nll_after": after.nll,
                "nll_lift": before.nll - after.nll,
                "acc_before": before.accuracy,
                "acc_after": after.accuracy,
                "acc_lift": after.accuracy - before.accuracy,
                "train_reward_before": outcome.train_reward_before,
                "train_reward_after": outcome.train_reward_after,
                "policy_version_before": version_before,
                "policy_version_after": version_name(new_version[0])
                if new_version
                else version_before,
                "rolled_back": rolled_back,
                "steps": outcome.steps,
                "duration_s": time.perf_counter() - t0,
                "plasticity": Plasticity(
                    dormant_fraction=after.dormant_fraction,
                    effective_rank=after.effective_rank,
                    weight_norm=w_norm,
                    grad_norm=outcome.grad_norm,
                    policy_entropy=after.entropy,
                    probe_nll=after.nll,
                ),
                "target": target,
                "target_lift": _lift_json(part_lift(before, after, parts.target)),
                "transfer_lift": _lift_json(part_lift(before, after, parts.transfer)),
                "collateral_lift": _lift_json(part_lift(before, after, parts.collateral)),
            }
        )
        self.ledger.record(result, new_version)
        if new_version is not None:
            self.version = new_version[0]
            self._probe_before = after
        return Handled(result, duplicate=False)

    def close(self) -> None:
        self.ledger.close()
