"""Lift measurement on a held-out probe.

The seeds' target is NLL-lift: the drop in mean token NLL of the probe's
reference answers, teacher-forced and conditioned on the prompt, counting the
answer tokens only (plus the end-of-sequence token, because an answer is only
right if the policy also stops). It is smooth where small-probe accuracy is
jumpy. Accuracy is greedy (deterministic) and judged by each item's own
verifier. Both follow :class:`streams.schemas.LiftResult`:
``nll_lift = nll_before - nll_after`` and ``acc_lift = acc_after - acc_before``,
so positive means better.

One batched, no-grad forward pass over the probe also yields the plasticity
figures that need activations (dormant units, effective rank, entropy).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.trainer import plasticity
from streams.probes import ProbeItem

Verifier = Callable[[str, str], float]
VerifierLookup = Callable[[str, Mapping[str, Any]], Verifier]
PromptFormat = Callable[[PreTrainedTokenizerBase, str], str]

# A completion scoring at least this counts as correct for accuracy.
CORRECT_AT = 0.5


@dataclass(frozen=True)
class ProbeReport:
    """What one measurement of the policy on the probe found."""

    nll: float
    accuracy: float
    entropy: float
    dormant_fraction: float
    effective_rank: float


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

    def _batches(self) -> list[list[int]]:
        idx = list(range(len(self.items)))
        return [idx[i : i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    @torch.no_grad()
    def measure(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> ProbeReport:
        was_training = model.training
        model.eval()
        try:
            nll, entropy, dormant, erank = self._teacher_forced(model, tok)
            accuracy = self._accuracy(model, tok)
        finally:
            model.train(was_training)
        return ProbeReport(nll, accuracy, entropy, dormant, erank)

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
            a = tok(it.reference, add_special_tokens=False)["input_ids"] + eos
            seqs.append(list(p) + list(a))
            answer_starts.append(len(p))
        width = max(len(s) for s in seqs)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        target = torch.zeros((len(seqs), width), dtype=torch.bool)
        for r, (s, a0) in enumerate(zip(seqs, answer_starts, strict=True)):
            ids[r, : len(s)] = torch.tensor(s)
            attn[r, : len(s)] = 1
            target[r, a0 : len(s)] = True
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
        with plasticity.ActivationCapture(model) as capture:
            for idx in self._batches():
                ids, attn, target = self._encode(tok, idx, device)
                out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
                # Position t predicts token t+1: shift the target mask left.
                logits = out.logits[:, :-1].double()
                predicts_answer = target[:, 1:]
                logp = torch.log_softmax(logits, dim=-1)
                tok_lp = logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
                nll_sum += float(-(tok_lp[predicts_answer]).sum())
                k = int(predicts_answer.sum())
                n_tokens += k
                ent_sum += plasticity.token_entropy(logits, predicts_answer) * k
                masks.append(attn.bool())
                last_hidden.append(out.hidden_states[-1][attn.bool()])
            layers = capture.layers(masks)
        nll = nll_sum / max(n_tokens, 1)
        entropy = ent_sum / max(n_tokens, 1)
        if not plasticity_figures:
            # NLL alone: no SVD, which also fails on a diverged (non-finite) model.
            return nll, entropy, float("nan"), float("nan")
        dormant = plasticity.dormant_fraction(layers, self.tau)
        erank = plasticity.effective_rank(torch.cat(last_hidden, dim=0))
        return nll, entropy, dormant, erank

    def _accuracy(self, model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> float:
        device = next(model.parameters()).device
        correct = 0
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
                    if self._verifiers[i](c, self.items[i].reference) >= CORRECT_AT:
                        correct += 1
        finally:
            tok.padding_side = side
        return correct / len(self.items)
