"""Update alignment: does a cohort's GRPO update point where its target's probe wants to go?

The label the predictor learns is a cohort's lift on its target: the drop in
the target probe's answer NLL (items with a foothold) after GRPO trains on the
cohort. To first order, one gradient step of size ``eta`` on the cohort's GRPO
loss ``L_c`` changes the probe's NLL by ``-eta * <grad L_c, grad NLL_t>``; the
cosine of the two gradients says whether the update points the way the
target's items need, whatever its size (the other features measure the size:
``adv_std``, ``pass_var_per_token``). This is the first-order influence
estimate data-selection work uses (e.g. LESS, Xia et al. 2024), computed for a
cohort at the current weights.

Why it exists: cohorts of the same capability slice and difficulty differ in
lift by more than GRPO's seeds do, and no trace-only feature sees why (which
errors the policy makes on *these* prompts, and whether fixing them is what
the target's items need). Measured in docs/RESULTS.md.

Scale: the gradients are taken over the policy's last parameters (in
``model.parameters()`` order: the final blocks, norm and, when untied, the
output head) up to ``max_params`` of them, and kept as float32 vectors: one
per target with a foothold (the probe's side, kept per weights version) and
one per cohort. The lab's tiny policy fits whole; SmolLM2-135M is measured on
its last ~20M parameters (about 80 MB per target). The layers nearest the
output are where a few GRPO steps move a model most, and the budget bounds
memory and the backward pass for any model size.

It needs the policy's weights, so it is computed where the rollout engine
holds them (an in-process Hugging Face model) and passed to
:func:`daemon.core.features.featurize`; where no weights are at hand (a vLLM
server, traces that carry their own attempts with rollouts off) the feature
is 0, "not measured", as a familiarity feature is without log-probs.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import torch

from daemon.core.features import group_advantages
from daemon.policy.rollout import RolloutEngine, fill_attempts
from daemon.policy.teacher import pad_rows
from streams.probes import ProbeItem
from streams.schemas import MAX_ATTEMPTS, Trace

# Parameters the gradients are taken over, counted from the output end.
MAX_PARAMS = 20_000_000
# Tokens of one row that are read: the prompt's last, the answer's first.
# Traces may carry attempts of up to 8k tokens each (streams.schemas): the
# memory of a backward pass must not be theirs to choose.
MAX_PROMPT_TOKENS = 1024
MAX_ANSWER_TOKENS = 256
# Fresh attempts per prompt the cohort's gradient is estimated from
# (``policy.update_alignment_attempts``; 0: the cohort's own K attempts).
# GRPO's update is an expectation over the policy's answers; a cosine taken
# from K = 8 of them is mostly sampling noise inside a capability slice, and
# it sharpens as the sample grows (docs/FEATURES.md).
DEFAULT_ATTEMPTS = 128


def fresh_groups(
    traces: Sequence[Trace],
    engine: RolloutEngine,
    attempts: int,
    seed: int | None = None,
    *,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
) -> list[Trace]:
    """Each trace's prompt with ``attempts`` fresh attempts from ``engine``, to align.

    Drawn in rounds of at most ``MAX_ATTEMPTS`` (the most a trace carries);
    each round is a group of its own, as each of the trainer's steps draws
    its own. ``seed`` None derives one from the trace ids, so a cohort gets
    the same value wherever it is scored (a replaced pod, a replica). A trace
    its verifier now refuses is left out: it was scored once, and the value
    is an estimate over the rest.
    """
    if attempts < 1:
        raise ValueError(f"attempts: must be >= 1, got {attempts}")
    if seed is None:
        seed = zlib.crc32("\x00".join(t.trace_id for t in traces).encode())
    ids = [t.trace_id for t in traces]
    out: list[Trace] = []
    for r, start in enumerate(range(0, attempts, MAX_ATTEMPTS)):
        k = min(MAX_ATTEMPTS, attempts - start)
        # A round's seed apart from every other round's (fill_attempts adds k).
        got = fill_attempts(
            traces,
            engine,
            k,
            seed + 7919 * r,
            reprobe_ids=ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
        )
        out += got.traces
    return out


class UpdateAlignment:
    """Per target, the cosine between a cohort's GRPO gradient and the probe's NLL gradient.

    ``format_prompt`` is the framing the rollout engine and the trainer use.
    The probe's gradients depend on the weights only, so they are kept per
    ``weights_key`` (the policy version): a new key recomputes them.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        format_prompt: Callable[[str], str],
        probe: Mapping[str, Sequence[ProbeItem]],
        foothold_probability: float,
        *,
        batch_size: int = 64,
        max_params: int = MAX_PARAMS,
    ) -> None:
        if not 0.0 < foothold_probability < 1.0:
            raise ValueError(f"foothold_probability: must be in (0, 1), got {foothold_probability}")
        if max_params < 1:
            raise ValueError(f"max_params: must be >= 1, got {max_params}")
        self.model = model
        self.tokenizer = tokenizer
        self.format_prompt = format_prompt
        self.probe = {t: list(items) for t, items in probe.items() if items}
        self.max_item_nll = -math.log(foothold_probability)
        self.batch_size = batch_size
        self.max_params = max_params
        cfg = getattr(model, "config", None)
        # The model's context: a row longer than it cannot be read at all.
        self.max_positions: int | None = getattr(cfg, "n_positions", None) or getattr(
            cfg, "max_position_embeddings", None
        )
        self._key: Hashable = None
        self._probe_grads: dict[str, torch.Tensor | None] = {}

    def _params(self) -> list[torch.nn.Parameter]:
        """The trailing trainable parameters within the budget (at least one tensor)."""
        chosen: list[torch.nn.Parameter] = []
        total = 0
        for p in reversed([p for p in self.model.parameters() if p.requires_grad]):
            if chosen and total + p.numel() > self.max_params:
                break
            chosen.append(p)
            total += p.numel()
        return chosen[::-1]

    def _rows(
        self, prompts: Sequence[str], answers: Sequence[str]
    ) -> tuple[list[list[int]], list[int]]:
        """Token ids of prompt + answer (+ eos) per row, and where each answer starts.

        A prompt keeps its last MAX_PROMPT_TOKENS tokens, an answer its first
        MAX_ANSWER_TOKENS (the end-of-sequence token is then not appended: the
        answer did not end there); a row still longer than the model's context
        gives up answer tokens first, then the prompt's earliest, keeping at
        least one answer token.
        """
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        seqs: list[list[int]] = []
        starts: list[int] = []
        for p, a in zip(prompts, answers, strict=True):
            pi = list(tok(self.format_prompt(p))["input_ids"])[-MAX_PROMPT_TOKENS:]
            ai = list(tok(a, add_special_tokens=False)["input_ids"])
            ai = ai[:MAX_ANSWER_TOKENS] if len(ai) >= MAX_ANSWER_TOKENS else ai + eos
            limit = self.max_positions
            if limit is not None and len(pi) + len(ai) > limit:
                ai = ai[: max(1, limit - len(pi))]
                pi = pi[len(pi) + len(ai) - limit :] if len(pi) + len(ai) > limit else pi
            seqs.append(pi + ai)
            starts.append(len(pi))
        return seqs, starts

    def _answer_logprobs(
        self, prompts: Sequence[str], answers: Sequence[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed answer(+eos) log-prob and answer token count of each row, with grad."""
        return self._logprobs(*self._rows(prompts, answers))

    def _logprobs(
        self, seqs: Sequence[list[int]], starts: Sequence[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_answer_logprobs` of rows already tokenized by :meth:`_rows`."""
        device = next(self.model.parameters()).device
        ids, attn, answer = (
            x.to(device) for x in pad_rows(seqs, starts, self.tokenizer.pad_token_id)
        )
        logits = self.model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        # Position t predicts token t+1: the answer mask shifted left.
        mask = answer[:, 1:]
        return (lp * mask).sum(dim=1), mask.sum(dim=1)

    def _gradient(
        self, prompts: Sequence[str], answers: Sequence[str], weights: Sequence[float]
    ) -> torch.Tensor:
        """The gradient of ``-sum_i w_i log p(answer_i) / (answer tokens)``, float32.

        Taken ``batch_size`` rows at a time and summed, so memory is bounded
        by one batch whatever the cohort's size.
        """
        params = self._params()
        seqs, starts = self._rows(prompts, answers)
        # Position t predicts token t+1: a row's answer has len - start targets.
        n_tokens = max(1, sum(len(s) - a0 for s, a0 in zip(seqs, starts, strict=True)))
        total = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32)
        for i in range(0, len(seqs), self.batch_size):
            j = i + self.batch_size
            s, _ = self._logprobs(seqs[i:j], starts[i:j])
            w = torch.tensor(weights[i:j], dtype=s.dtype, device=s.device)
            grads = torch.autograd.grad(-(w * s).sum() / n_tokens, params, allow_unused=True)
            total += torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1).float().cpu()
                    for g, p in zip(grads, params, strict=True)
                ]
            )
        return total

    def _probe_gradient(self, target: str) -> torch.Tensor | None:
        """The gradient of the target's foothold items' token NLL (None: no foothold).

        The items and answers are the label's (``daemon.trainer.probe``): an
        item's ``answer`` when it gives one, else its reference.
        """
        items = self.probe[target]
        with torch.no_grad():
            item_nll: list[float] = []
            for i in range(0, len(items), self.batch_size):
                part = items[i : i + self.batch_size]
                s, _ = self._answer_logprobs(
                    [it.prompt for it in part], [it.nll_text for it in part]
                )
                item_nll += [float(-x) for x in s]
        # The label's items: those the policy produces with at least the
        # foothold probability (daemon.trainer.probe.has_foothold).
        held = [it for it, nll in zip(items, item_nll, strict=True) if nll <= self.max_item_nll]
        if not held:
            return None
        # The mean token NLL of their answers (the probe's: ``ProbeItem.nll_text``).
        return self._gradient(
            [it.prompt for it in held], [it.nll_text for it in held], [1.0] * len(held)
        )

    def measure(
        self,
        traces: Sequence[Trace],
        targets: Sequence[str],
        weights_key: Hashable,
        engine: RolloutEngine,
        attempts: int,
        seed: int | None = None,
        *,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
    ) -> dict[str, float]:
        """As the scorer measures it: on ``attempts`` fresh attempts per prompt
        (:func:`fresh_groups`), or on the cohort's own when ``attempts`` is 0.

        A cohort whose own attempts carry no learning signal gets 0 and
        nothing is sampled: the predictor serves 0 for it whatever this says
        (``daemon.core.predictor.has_learning_signal``), and such cohorts (all
        known, no foothold) are common traffic, whose sampling would be most
        of the feature's cost.
        """
        if attempts > 0 and any(len({a.reward for a in t.attempts}) > 1 for t in traces):
            traces = fresh_groups(
                traces,
                engine,
                attempts,
                seed,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
            )
        return self(traces, targets, weights_key)

    def __call__(
        self, traces: Sequence[Trace], targets: Sequence[str], weights_key: Hashable
    ) -> dict[str, float]:
        """The cohort's alignment with each of ``targets`` that has probe items.

        0 where the cohort has no learning signal (every group's rewards equal:
        GRPO's gradient is zero) or the target has no item with a foothold.
        """
        if weights_key != self._key:
            self._key, self._probe_grads = weights_key, {}
        wanted = [t for t in dict.fromkeys(targets) if t in self.probe]
        prompts: list[str] = []
        answers: list[str] = []
        weights: list[float] = []
        for trace in traces:
            adv = group_advantages([a.reward for a in trace.attempts]).tolist()
            for a, w in zip(trace.attempts, adv, strict=True):
                if w != 0.0:
                    prompts.append(trace.prompt)
                    answers.append(a.completion)
                    weights.append(w)
        if not prompts or not wanted:
            return dict.fromkeys(wanted, 0.0)
        was_training = self.model.training
        self.model.eval()  # no dropout: the same cohort gives the same value
        try:
            for t in wanted:
                if t not in self._probe_grads:
                    self._probe_grads[t] = self._probe_gradient(t)
            # TRL's GRPO loss: advantage-weighted log-likelihood, token-normalised.
            g = self._gradient(prompts, answers, weights)
        finally:
            self.model.train(was_training)
        out: dict[str, float] = {}
        g64 = g.double()
        g_norm = float(g64.norm())
        for t in wanted:
            pg = self._probe_grads[t]
            pg_norm = float(pg.double().norm()) if pg is not None else 0.0
            if pg is None or g_norm == 0.0 or pg_norm == 0.0:
                out[t] = 0.0
                continue
            # The cohort's loss gradient against the probe's NLL gradient: a
            # descent step on the loss lowers the probe NLL when they agree.
            out[t] = float(g64 @ pg.double()) / (g_norm * pg_norm)
        return out
