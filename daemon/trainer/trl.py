"""The TRL backend: GRPO steps with TRL's ``GRPOTrainer``."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from daemon.config import GRPOParams
from daemon.trainer.backend import TrainOutcome


class TRLBackend:
    name = "trl"

    def train(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        rows: Sequence[Mapping[str, str]],
        reward: Callable[..., list[float | None]],
        params: GRPOParams,
    ) -> TrainOutcome:
        return grpo_train(model, tok, rows, reward, params)


def grpo_train(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    rows: Sequence[Mapping[str, str]],
    reward: Callable[..., list[float | None]],
    params: GRPOParams,
) -> TrainOutcome:
    """Run ``params.steps`` GRPO steps on ``rows`` in place on ``model``."""
    # Imported here: TRL pulls in much of transformers, and only the trainer
    # process needs it.
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    if not rows:
        raise ValueError("rows: a cohort needs at least one prompt")
    prompts_per_step = min(len(rows), params.max_prompts_per_step)
    cuda = torch.cuda.is_available()
    use_cache = getattr(model.config, "use_cache", None)
    hooks_before = _forward_hook_ids(model)
    marked_before = {id(m) for m in model.modules() if _CAPTURE_MARK in m.__dict__}
    checkpointing_before = _checkpointing(model)
    with tempfile.TemporaryDirectory(prefix="tapd-grpo-") as work:
        config = GRPOConfig(
            output_dir=work,
            num_generations=params.num_generations,
            per_device_train_batch_size=params.num_generations * prompts_per_step,
            max_completion_length=params.max_completion_length,
            beta=params.beta,
            learning_rate=params.learning_rate,
            lr_scheduler_type="constant",
            optim=params.optimizer,
            temperature=params.temperature,
            max_steps=params.steps,
            seed=params.seed,
            data_seed=params.seed,
            report_to="none",
            use_cpu=not cuda,
            # TRL defaults to bf16; on CPU it is slow for a tiny policy and its
            # rounding swamps its small updates; a real model on a CPU with
            # bf16 units (AMX) gains ~1.4x, hence the option.
            bf16=cuda or params.bf16_autocast,
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            log_level="error",
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=config,
            train_dataset=Dataset.from_list([dict(r) for r in rows]),
            processing_class=tok,
            peft_config=_lora_config(params),
        )
        # The service logs its own JSON lines; TRL's printed dicts would interleave.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        positions = model.register_forward_pre_hook(_positions_from_mask, with_kwargs=True)
        try:
            trainer.train()
        finally:
            positions.remove()
            if params.lora_rank > 0:
                # Fold the adapters into ``model``'s own Linear layers (in place)
                # and drop them: the caller keeps one plain model object.
                trainer.model.merge_and_unload()  # type: ignore[operator,union-attr]
            _unwrap(model, use_cache, hooks_before, marked_before, checkpointing_before)
        history = trainer.state.log_history
    steps = [h for h in history if "reward" in h]
    rewards = tuple(float(h["reward"]) for h in steps)
    grad = float(steps[-1].get("grad_norm", 0.0)) if steps else 0.0
    model.eval()
    return TrainOutcome(
        steps=len(steps), rewards=rewards, grad_norm=grad if math.isfinite(grad) else 0.0
    )


def _lora_config(params: GRPOParams) -> Any:
    """peft's LoRA on every linear layer but the output head, or ``None`` for full training."""
    if params.lora_rank == 0:
        return None
    try:
        from peft import LoraConfig
    except ImportError:
        raise RuntimeError("grpo.lora_rank > 0 needs peft: pip install 'tapd[lora]'") from None
    return LoraConfig(
        r=params.lora_rank,
        lora_alpha=int(params.lora_alpha),
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def _positions_from_mask(
    _module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Give a left-padded forward pass the positions that generation used.

    TRL scores completions with ``model(input_ids, attention_mask)`` and no
    ``position_ids``; a model with absolute position embeddings (GPT-2) then
    counts left padding as positions, so the loss would be taken under
    different positions than the samples were drawn with, and every update
    would damage the policy it is meant to improve. Generation derives the
    positions from the attention mask; so does this hook. (Rotary models are
    shift-invariant; for them it changes nothing.)
    """
    mask = kwargs.get("attention_mask")
    ids = kwargs.get("input_ids")
    if (
        kwargs.get("position_ids") is None
        and mask is not None
        and ids is not None
        and mask.dim() == 2
    ):
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs["position_ids"] = pos[:, -ids.shape[1] :]
    return args, kwargs


# transformers installs its output-capturing hooks on a model's first forward
# pass and marks the model so; where that pass was the training run's, the hooks
# are dropped with the rest, and the mark with them, so the next pass that needs
# them installs them again.
_CAPTURE_MARK = "_output_capturing_hooks_installed"
# The per-module dicts a forward hook lives in, keyed by the hook's handle id.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _forward_hook_ids(model: torch.nn.Module) -> dict[int, set[int]]:
    """The forward (pre-)hook handle ids on each module, by the module's id."""
    return {
        id(m): {k for name in _HOOK_DICTS for k in getattr(m, name, {})} for m in model.modules()
    }


def _unwrap(
    model: PreTrainedModel,
    use_cache: bool | None,
    hooks_before: dict[int, set[int]],
    marked_before: set[int],
    checkpointing_before: bool,
) -> None:
    """Undo what the training run left on the model object.

    Accelerate replaces ``model.forward`` with a mixed-precision autocast
    wrapper and TRL turns the KV cache off; both outlive the trainer and
    would change every later probe measurement (by ~0.1 nats under bf16).

    TRL also switches gradient checkpointing off and on around every
    generation, and each switch-on registers one more forward hook on the
    input embeddings (``enable_input_require_grads``) that nothing removes:
    ~1,600 hooks per closed-loop run of the evaluation, every one of them
    called on every later forward pass, so a long-lived trainer got slower
    with each dispatch (a worker's 25th run cost 5x its first). Every forward
    hook the run added is dropped here, and checkpointing is set back to what
    it was.
    """
    model.__dict__.pop("forward", None)
    model.__dict__.pop("_original_forward", None)
    if use_cache is not None:
        model.config.use_cache = use_cache
    for m in model.modules():
        keep = hooks_before.get(id(m), set())
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if hooks:
                for k in [k for k in hooks if k not in keep]:
                    del hooks[k]
        if id(m) not in marked_before:
            m.__dict__.pop(_CAPTURE_MARK, None)
    if _checkpointing(model) and not checkpointing_before:
        off = getattr(model, "activation_checkpointing_disable", None)
        (off or model.gradient_checkpointing_disable)()


def _checkpointing(model: PreTrainedModel) -> bool:
    # The current names where this transformers has them: transformers 5.2x
    # warns (FutureWarning) on every use of the gradient_* aliases.
    on = getattr(model, "is_activation_checkpointing", None)
    return bool(model.is_gradient_checkpointing if on is None else on)
