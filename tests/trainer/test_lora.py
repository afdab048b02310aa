"""GRPO with LoRA adapters and bf16 autocast: the cost levers for a real model on CPU.

A tiny random Llama (the architecture of SmolLM2) and the lab's ``scrambled``
verifier, whose pseudo-random rewards give every group a nonzero advantage,
so every step has a gradient. Real TRL, real peft.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from daemon.config import GRPOParams
from daemon.policy.store import snapshot
from daemon.trainer.cohort import CohortReward
from daemon.trainer.trl import grpo_train
from daemon.verify.registry import get_verifier
from lab.tokenizer import build_char_tokenizer

pytest.importorskip("peft", reason="LoRA needs peft (pip install 'tapd[lora]')")


def _model_and_tok() -> tuple[LlamaForCausalLM, object]:
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval(), tok


ROWS = [
    {"prompt": p, "reference": "0", "verifier": "scrambled", "verifier_args": json.dumps({})}
    for p in ("1+2=", "3+4=", "5+6=", "7+8=")
]


def _train(model: LlamaForCausalLM, tok: object, **kw: Any) -> None:
    params = GRPOParams(
        num_generations=4, max_completion_length=4, steps=2, learning_rate=5e-2, **kw
    )
    torch.set_num_threads(1)
    grpo_train(model, tok, ROWS, CohortReward(get_verifier), params)  # type: ignore[arg-type]


def test_lora_update_is_merged_into_the_same_plain_model() -> None:
    model, tok = _model_and_tok()
    before = snapshot(model)
    _train(model, tok, lora_rank=4, lora_alpha=8)
    after = model.state_dict()
    assert type(model) is LlamaForCausalLM
    assert after.keys() == before.keys()  # no adapter weights left behind
    assert not any("lora" in name for name, _ in model.named_modules())
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    # Adapters sit on the attention and MLP projections; embeddings, norms and
    # the output head are frozen under LoRA.
    assert changed and all(("proj" in k) for k in changed), changed
    assert "lm_head.weight" not in changed and "model.embed_tokens.weight" not in changed
    # A second cohort wraps and merges again from the merged weights.
    mid = snapshot(model)
    _train(model, tok, lora_rank=4, lora_alpha=8)
    assert any(not torch.equal(mid[k], v) for k, v in model.state_dict().items())


def test_full_training_is_still_the_default() -> None:
    model, tok = _model_and_tok()
    before = snapshot(model)
    _train(model, tok)
    assert not torch.equal(before["lm_head.weight"], model.state_dict()["lm_head.weight"])


def test_bf16_autocast_leaves_a_float32_model_without_wrappers() -> None:
    model, tok = _model_and_tok()
    _train(model, tok, lora_rank=4, bf16_autocast=True)
    assert "forward" not in model.__dict__  # the autocast wrapper is gone
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.tensor([[1, 2, 3]])
    assert model(ids).logits.dtype == torch.float32  # no autocast outlives training
