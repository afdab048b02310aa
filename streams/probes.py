"""The probe file: held-out evaluation items per target (capability slice).

Lift is measured on a probe. In production the probe is the platform's own
evaluation items, grouped by the capability slice (``target``) each one
tests, given to tapd as a JSON Lines file (``policy.probe_path``), one item a
line::

    {"target": "add/2d_carry", "prompt": "47+38=", "reference": "85",
     "verifier": "numeric", "verifier_args": {}}

The lift is the drop in the teacher-forced NLL of each item's answer. That
answer is ``reference`` unless the item gives ``answer``: the same answer as
the policy writes it. A chat model answers "4 + 1 equals 5.", not "5", and
gives a bare reference so little probability (6-24 nats per item for
SmolLM2-135M-Instruct on reasoning-gym) that no item would count as one the
policy has a foothold on, so the target's lift and ``update_alignment``
would measure nothing. ``tapd probe answers`` fills ``answer`` from the
policy's own verified answers (:func:`daemon.policy.answers.own_answers`).
The verifier always judges against ``reference``.

Both roles read the same file: the trainer measures lift on it, the scorer
measures each cohort's ``target_similarity`` against its prompts. A bad line
is refused with its line number, field and reason (nothing half-loaded).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from streams.rejection import Rejection
from streams.schemas import MAX_ID_CHARS, MAX_TEXT_CHARS


class ProbeFileError(Rejection):
    """A probe file that cannot be used; ``field`` is ``line <n>.<field>``."""


class ProbeItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    target: str = Field(default="", max_length=MAX_ID_CHARS)
    prompt: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    reference: str = Field(max_length=MAX_TEXT_CHARS)
    verifier: str = Field(min_length=1, max_length=MAX_ID_CHARS)
    verifier_args: Mapping[str, Any] = Field(default_factory=dict)
    # The answer in the policy's own words, whose NLL is measured (module docstring).
    answer: str | None = Field(default=None, min_length=1, max_length=MAX_TEXT_CHARS)

    @property
    def nll_text(self) -> str:
        """The text whose teacher-forced NLL the probe measures: ``answer``, else ``reference``."""
        return self.answer if self.answer is not None else self.reference


def read_probe_file(path: Path | str) -> list[ProbeItem]:
    """Every item of the probe file at ``path`` (at least one)."""
    items: list[ProbeItem] = []
    with Path(path).open("rb") as fh:
        for n, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                items.append(ProbeItem.model_validate(obj))
            except ValidationError as e:
                err = e.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "item"
                raise ProbeFileError(f"{path}: line {n}.{where}", err["msg"]) from None
            except ValueError as e:  # JSON syntax, oversized integers, bad UTF-8
                raise ProbeFileError(f"{path}: line {n}", f"not valid JSON ({e})") from None
    if not items:
        raise ProbeFileError(str(path), "no probe items")
    return items


def write_probe_file(path: Path | str, items: Iterable[ProbeItem]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w") as fh:
        for it in items:
            # No "answer": null: a file without answers reads as it always did.
            fh.write(it.model_dump_json(exclude={"answer"} if it.answer is None else None) + "\n")
    tmp.replace(path)
    return path


def targets(items: Sequence[ProbeItem]) -> dict[str, list[ProbeItem]]:
    """The items grouped by target, in file order."""
    out: dict[str, list[ProbeItem]] = {}
    for it in items:
        out.setdefault(it.target, []).append(it)
    return out


def cohort_target(subject: str, target: str | None, known: Iterable[str]) -> str | None:
    """The probe target a cohort is measured against, or None when the probe has none for it.

    A dispatch may name its target; otherwise a cohort's target is its
    subject, when the probe file has items of that target. Both roles use this
    one rule: the scorer for ``target_similarity``, the trainer for the lift.
    """
    names = set(known)
    if target is not None:
        return target if target in names else None
    return subject if subject in names else None
