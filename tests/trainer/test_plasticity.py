"""Plasticity figures against hand-computed values on constructed activations."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from daemon.trainer import plasticity


def test_dormant_fraction_counts_silent_units() -> None:
    acts = torch.ones(16, 8)
    acts[:, 2] = 0.0
    acts[:, 5] = 0.0
    assert plasticity.dormant_fraction([acts]) == pytest.approx(0.25)


def test_dormant_fraction_uses_score_relative_to_layer_mean() -> None:
    # Per-unit mean |a|: 1, 1, 1, 0.1 -> layer mean 0.775; scores 1.29.., 0.129...
    acts = torch.tensor([[1.0, -1.0, 1.0, 0.1], [-1.0, 1.0, -1.0, -0.1]])
    assert plasticity.dormant_fraction([acts], tau=0.1) == 0.0
    assert plasticity.dormant_fraction([acts], tau=0.13) == pytest.approx(0.25)


def test_dormant_fraction_pools_units_over_layers() -> None:
    a = torch.ones(4, 8)
    a[:, :2] = 0.0  # 2 of 8 dormant
    b = torch.zeros(4, 4)  # a silent layer is wholly dormant
    assert plasticity.dormant_fraction([a, b]) == pytest.approx(6 / 12)


def test_dormant_fraction_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="tau"):
        plasticity.dormant_fraction([torch.ones(2, 2)], tau=-1)
    with pytest.raises(ValueError, match=r"layers\[0\]"):
        plasticity.dormant_fraction([torch.ones(2)])


@pytest.mark.parametrize("n", [1, 3, 8])
def test_effective_rank_of_identity_features_is_n(n: int) -> None:
    assert plasticity.effective_rank(torch.eye(n)) == pytest.approx(n)


def test_effective_rank_of_rank_one_features_is_one() -> None:
    u = torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    v = torch.randn(1, 6, generator=torch.Generator().manual_seed(1))
    assert plasticity.effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)


def test_effective_rank_matches_entropy_of_normalized_singular_values() -> None:
    # Singular values 3 and 1: p = (0.75, 0.25).
    x = torch.diag(torch.tensor([3.0, 1.0]))
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert plasticity.effective_rank(x) == pytest.approx(math.exp(h))
    assert plasticity.effective_rank(torch.zeros(3, 3)) == 0.0


def test_weight_norm_and_entropy_by_hand() -> None:
    assert plasticity.weight_norm([torch.tensor([3.0]), torch.tensor([[4.0]])]) == pytest.approx(
        5.0
    )
    uniform = torch.zeros(1, 2, 4)
    peaked = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    assert plasticity.token_entropy(uniform, mask) == pytest.approx(math.log(4))
    assert plasticity.token_entropy(peaked, torch.tensor([[False, True]])) == pytest.approx(
        0.0, abs=1e-6
    )


def test_capture_finds_gpt2_mlp_activations_and_masks_padding() -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=16, n_positions=8, n_embd=8, n_layer=2, n_head=2))
    names = [n for n, _ in plasticity.activation_modules(model)]
    assert names == ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    with plasticity.ActivationCapture(model) as cap, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    layers = cap.layers([mask])
    assert [tuple(t.shape) for t in layers] == [(5, 32), (5, 32)]
    # Hooks are gone after the block: a second pass records nothing more.
    with torch.no_grad():
        model(input_ids=ids)
    assert [tuple(t.shape) for t in cap.layers([mask])] == [(5, 32), (5, 32)]
    with pytest.raises(ValueError, match="no MLP activation"):
        plasticity.activation_modules(torch.nn.Linear(2, 2))
