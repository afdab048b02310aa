"""Lift measurement on a held-out probe.

The seeds' target is NLL-lift: the drop in mean token NLL of the probe's
answers (each item's reference, or its ``answer`` in the policy's own words
where the probe file gives one: ``streams.probes``), teacher-forced and
conditioned on the prompt, counting the answer tokens only (plus the
end-of-sequence token, because an answer is only right if the policy also
stops). It is smooth where small-probe accuracy is
jumpy. Accuracy is greedy (deterministic) and judged by each item's own
verifier. Both follow :class:`streams.schemas.LiftResult`:
``nll_lift = nll_before - nll_after`` and ``acc_lift = acc_after - acc_before``,
so positive means better.

One batched, no-grad forward pass over the probe also yields the plasticity
figures that need activations (dormant units, effective rank, entropy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.policy.teacher import pad_rows
from daemon.trainer import plasticity
from streams.probes import ProbeItem

Verifier = Callable[[str, str], float]
VerifierLookup = Callable[[str, Mapping[str, Any]], Verifier]
PromptFormat = Callable[[PreTrainedTokenizerBase, str], str]

# A completion scoring at least this counts as correct for accuracy.
CORRECT_AT = 0.5


@dataclass(frozen=True)
class ProbeReport:
    """What one measurement of the policy on the probe found.

    ``nll`` and ``accuracy`` pool every item; the per-item arrays (in probe
    order) let :func:`part_lift` measure any subset, e.g. one target's items.
    """

    nll: float
    accuracy: float
    entropy: float
    dormant_fraction: float
    effective_rank: float
    item_nll: tuple[float, ...] = ()  # summed token NLL of each item's answer + eos, nats
    item_tokens: tuple[int, ...] = ()  # answer tokens + eos of each item
    item_correct: tuple[bool, ...] = ()  # greedy completion judged right by its verifier


def _identity_format(_tok: PreTrainedTokenizerBase, prompt: str) -> str:
    return prompt


class Probe:
    """A fixed held-out probe and the way to measure a policy on it."""

    def __init__(
        self,
        items: Sequence[ProbeItem],
        verifiers: VerifierLookup,
        format_prompt: PromptFormat = _identity_format,
        *,
        max_new_tokens: int = 16,
        batch_size: int = 64,
        tau: float = plasticity.DEFAULT_TAU,
    ) -> None:
        if not items:
            raise ValueError("probe: needs at least one item")
        self.items = list(items)
        self._verifiers = [verifiers(it.verifier, dict(it.verifier_args)) for it in self.items]
        self.format_prompt = format_prompt
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.tau = tau
        self._last_items: tuple[tuple[float, ...], tuple[int, ...]] = ((), ())

    @property
    def targets(self) -> frozenset[str]:
        """The targets (capability slices) the probe has items for."""
        return frozenset(it.target for it in self.items if it.target)

    def _batches(self) -> list[list[int]]:
        idx = list(range(len(self.items)))
        return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    @torch.no_grad()
    def measure(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> ProbeReport:
        was_training = model.training
        model.eval()
        try:
            nll, entropy, dormant, erank = self._teacher_forced(model, tok)
            correct = self._correct(model, tok)
        finally:
            model.train(was_training)
        sums, counts = self._last_items
        return ProbeReport(
            nll,
            sum(correct) / len(self.items),
            entropy,
            dormant,
            erank,
            item_nll=sums,
            item_tokens=counts,
            item_correct=correct,
        )

    def nll(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> float:
        """Mean token NLL of the reference answers alone (cheaper than :meth:`measure`)."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return self._teacher_forced(model, tok, plasticity_figures=False)[0]
        finally:
            model.train(was_training)

    def _encode(
        self, tok: PreTrainedTokenizerBase, idx: Sequence[int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded prompt+answer ids, attention mask, and answer-target mask."""
        seqs: list[list[int]] = []
        answer_starts: list[int] = []
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        for i in idx:
            it = self.items[i]
            # The prompt is encoded as GRPO encodes it (with its special tokens).
            p = tok(self.format_prompt(tok, it.prompt))["input_ids"]
            # The answer whose NLL is the lift: the item's own words for it when
            # given (a chat model's), else the reference (streams.probes).
            a = tok(it.nll_text, add_special_tokens=False)["input_ids"] + eos
            seqs.append(list(p) + list(a))
            answer_starts.append(len(p))
        ids, attn, target = pad_rows(seqs, answer_starts, tok.pad_token_id)
        return ids.to(device), attn.to(device), target.to(device)

    def _teacher_forced(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        *,
        plasticity_figures: bool = True,
    ) -> tuple[float, float, float, float]:
        device = next(model.parameters()).device
        nll_sum = 0.0
        n_tokens = 0
        ent_sum = 0.0
        masks: list[torch.Tensor] = []
        last_hidden: list[torch.Tensor] = []
        item_sums: list[float] = []
        item_counts: list[int] = []
        with plasticity.ActivationCapture(model) as capture:
            for idx in self._batches():
                ids, attn, target = self._encode(tok, idx, device)
                out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
                # Position t predicts token t+1: shift the target mask left.
                logits = out.logits[:, :-1].double()
                predicts_answer = target[:, 1:]
                logp = torch.log_softmax(logits, dim=-1)
                tok_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                per_item = -(tok_lp * predicts_answer).sum(dim=1)
                item_sums.extend(float(x) for x in per_item)
                item_counts.extend(int(x) for x in predicts_answer.sum(dim=1))
                nll_sum += float(-(tok_lp[predicts_answer]).sum())
                k = int(predicts_answer.sum())
                n_tokens += k
                ent_sum += plasticity.token_entropy(logits, predicts_answer) * k
                masks.append(attn.bool())
                last_hidden.append(out.hidden_states[-1][attn.bool()])
            layers = capture.layers(masks)
        self._last_items = (tuple(item_sums), tuple(item_counts))
        nll = nll_sum / max(n_tokens, 1)
        entropy = ent_sum / max(n_tokens, 1)
        if not plasticity_figures:
            # NLL alone: no SVD, which also fails on a diverged (non-finite) model.
            return nll, entropy, float("nan"), float("nan")
        dormant = plasticity.dormant_fraction(layers, self.tau)
        erank = plasticity.effective_rank(torch.cat(last_hidden, dim=0))
        return nll, entropy, dormant, erank

    def _correct(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> tuple[bool, ...]:
        """Whether each item's greedy completion is judged right by its own verifier."""
        device = next(model.parameters()).device
        correct: list[bool] = []
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            for idx in self._batches():
                prompts = [self.format_prompt(tok, self.items[i].prompt) for i in idx]
                enc = tok(prompts, return_tensors="pt", padding=True)
                enc = {k: v.to(device) for k, v in enc.items()}
                out = model.generate(  # type: ignore[operator]
                    **enc,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                )
                completions = tok.batch_decode(
                    out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for i, c in zip(idx, completions, strict=True):
                    correct.append(self._verifiers[i](c, self.items[i].reference) >= CORRECT_AT)
        finally:
            tok.padding_side = side
        return tuple(correct)


# --- lift per part of the probe ------------------------------------------------------

# An item has a foothold when the policy would produce its reference (answer and
# end of sequence) with at least this probability: below it, K = 8 samples all
# miss the item 88 % of the time, so GRPO has nothing there to reinforce.
DEFAULT_FOOTHOLD_PROBABILITY = 1.0 / 64.0


@dataclass(frozen=True)
class PartLift:
    """NLL and accuracy before and after one update, over one subset of probe items."""

    items: int
    tokens: int
    nll_before: float
    nll_after: float
    acc_before: float
    acc_after: float

    @property
    def nll_lift(self) -> float:
        return self.nll_before - self.nll_after

    @property
    def acc_lift(self) -> float:
        return self.acc_after - self.acc_before


@dataclass(frozen=True)
class ProbeParts:
    """Item indices of the three parts of the probe, relative to one cohort's target.

    * ``target``: items of the cohort's target on which the policy had a foothold
      before the update (what the cohort is meant to teach: the primary label);
    * ``transfer``: items of every other target with a foothold;
    * ``collateral``: items without a foothold, whatever their target (the
      policy could not produce them; an update can only make them worse or
      leave them, and their NLL of many nats would swamp the other parts).
    """

    target: tuple[int, ...]
    transfer: tuple[int, ...]
    collateral: tuple[int, ...]


def has_foothold(item_nll: float, min_probability: float) -> bool:
    return item_nll <= -math.log(min_probability)


def probe_parts(
    items: Sequence[ProbeItem],
    before: ProbeReport,
    target: str | None,
    min_probability: float = DEFAULT_FOOTHOLD_PROBABILITY,
) -> ProbeParts:
    """Split the probe by the cohort's ``target`` and by foothold under the pre-update policy."""
    if len(before.item_nll) != len(items):
        raise ValueError(
            f"before: {len(before.item_nll)} item measurements for a probe of {len(items)} items"
        )
    tgt: list[int] = []
    other: list[int] = []
    none: list[int] = []
    for i, (it, nll) in enumerate(zip(items, before.item_nll, strict=True)):
        if not has_foothold(nll, min_probability):
            none.append(i)
        elif target is not None and it.target == target:
            tgt.append(i)
        else:
            other.append(i)
    return ProbeParts(tuple(tgt), tuple(other), tuple(none))


def part_lift(before: ProbeReport, after: ProbeReport, idx: Sequence[int]) -> PartLift | None:
    """Token-pooled NLL and accuracy over the items ``idx``; None when there are none."""
    if not idx:
        return None
    tokens = sum(before.item_tokens[i] for i in idx)
    denom = max(tokens, 1)
    return PartLift(
        items=len(idx),
        tokens=tokens,
        nll_before=sum(before.item_nll[i] for i in idx) / denom,
        nll_after=sum(after.item_nll[i] for i in idx) / denom,
        acc_before=sum(before.item_correct[i] for i in idx) / len(idx),
        acc_after=sum(after.item_correct[i] for i in idx) / len(idx),
    )
