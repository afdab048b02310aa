"""The Hugging Face rollout engine: batched ``generate`` on any device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from daemon.policy.rollout import SampledAttempt, _check_args, _prompt_formatter


@contextlib.contextmanager
def _seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Seed torch for one block without disturbing the caller's random state."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class HFRolloutEngine:
    """Batched sampling with ``transformers`` ``generate``.

    Rows (prompt x attempt) are sampled ``batch_size`` at a time, left-padded.
    With a ``seed``, batch ``b`` is sampled under ``seed + b``: the same
    prompts, ``k``, ``batch_size`` and seed give the same attempts.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        format_prompt: Callable[[str], str] | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.format_prompt = format_prompt or _prompt_formatter(tokenizer)
        self.eos_id: int | None = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_id or 0)
        cfg = model.config
        self.max_positions: int | None = getattr(cfg, "n_positions", None) or getattr(
            cfg, "max_position_embeddings", None
        )

    def _encode(self, prompt: str, max_new_tokens: int) -> list[int]:
        ids: list[int] = self.tokenizer(self.format_prompt(prompt))["input_ids"]
        if self.max_positions is not None:
            room = self.max_positions - max_new_tokens
            if room < 1:
                raise ValueError(
                    f"max_new_tokens: {max_new_tokens} leaves no room for a prompt "
                    f"in the model's {self.max_positions} positions"
                )
            # Keep the end of an over-long prompt: the question is usually last.
            ids = ids[-room:]
        return ids

    def sample(
        self,
        prompts: Sequence[str],
        k: int,
        *,
        max_new_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
    ) -> list[list[SampledAttempt]]:
        _check_args(k, max_new_tokens, temperature)
        encoded = [self._encode(p, max_new_tokens) for p in prompts]
        rows = [ids for ids in encoded for _ in range(k)]
        flat: list[SampledAttempt] = []
        for b, start in enumerate(range(0, len(rows), self.batch_size)):
            batch = rows[start : start + self.batch_size]
            batch_seed = None if seed is None else seed + b
            flat.extend(self._sample_batch(batch, max_new_tokens, temperature, batch_seed))
        return [flat[i * k : (i + 1) * k] for i in range(len(prompts))]

    @torch.no_grad()
    def _sample_batch(
        self, rows: list[list[int]], max_new_tokens: int, temperature: float, seed: int | None
    ) -> list[SampledAttempt]:
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
            attention[i, width - len(r) :] = 1
        with _seeded(seed, self.device):
            out = self.model.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                max_new_tokens=max_new_tokens,
                eos_token_id=self.eos_id,
                pad_token_id=self.pad_id,
                return_dict_in_generate=True,
                output_logits=True,
            )
        new = out.sequences[:, width:]  # (rows, steps)
        logits = torch.stack(out.logits, dim=1).float()  # (rows, steps, vocab), raw
        logp = torch.log_softmax(logits, dim=-1)
        token_lp = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        results = []
        for i in range(len(rows)):
            ids = new[i].tolist()
            # The completion ends before EOS; EOS itself is not a completion token.
            n = ids.index(self.eos_id) if self.eos_id in ids else len(ids)
            results.append(
                SampledAttempt(
                    completion=self.tokenizer.decode(ids[:n], skip_special_tokens=True),
                    n_tokens=n,
                    token_logprobs=[min(x, 0.0) for x in token_lp[i, :n].tolist()],
                    token_entropies=[max(x, 0.0) for x in entropy[i, :n].tolist()],
                )
            )
        return results
