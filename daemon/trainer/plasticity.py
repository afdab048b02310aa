"""Plasticity figures of a policy: is it still able to learn?

Continual RL slowly costs a network its plasticity: units go silent, the
hidden features collapse onto a few directions, weights grow. These pure
functions compute the figures the trainer reports after every cohort (see
``docs/TRAINER.md`` for the definitions):

* :func:`dormant_fraction`: ReDo (Sokar et al., 2023). A unit's score is its
  mean |activation| over the batch divided by the mean of that over its
  layer's units; the unit is dormant when its score is ``<= tau``. The
  fraction is over all units of all captured layers.
* :func:`effective_rank`: Roy & Vetterli (2007), ``exp(H(p))`` with ``p`` the
  singular values normalised to sum to 1 (no centring). ``n`` orthonormal
  feature directions give ``n``; rank-one features give 1.
* :func:`weight_norm`, :func:`token_entropy`.

:class:`ActivationCapture` holds forward hooks on the MLP activation modules
of a Hugging Face causal LM (GPT-2's ``mlp.act``, Llama/Qwen's
``mlp.act_fn``), so that one probe forward pass yields the activations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from types import TracebackType

import torch
from torch import nn

DEFAULT_TAU = 0.1

# Names of the activation module inside an MLP block, across HF causal LMs.
_ACTIVATION_SUFFIXES = ("mlp.act", "mlp.act_fn", "mlp.activation_fn", "mlp.activation")


def dormant_fraction(layers: Sequence[torch.Tensor], tau: float = DEFAULT_TAU) -> float:
    """Share of dormant units over ``layers``, each a ``(samples, units)`` activation matrix."""
    if tau < 0:
        raise ValueError(f"tau: must be >= 0, got {tau}")
    dormant = 0
    total = 0
    for i, acts in enumerate(layers):
        if acts.dim() != 2 or acts.shape[0] == 0:
            raise ValueError(f"layers[{i}]: expected a non-empty (samples, units) matrix")
        per_unit = acts.detach().double().abs().mean(dim=0)
        layer_mean = per_unit.mean()
        # A layer with no activity at all is entirely dormant, not 0/0.
        score = per_unit / layer_mean if layer_mean > 0 else torch.zeros_like(per_unit)
        dormant += int((score <= tau).sum())
        total += per_unit.numel()
    if total == 0:
        raise ValueError("layers: no units to score")
    return dormant / total


def effective_rank(features: torch.Tensor) -> float:
    """Roy & Vetterli's effective rank of a ``(samples, dims)`` feature matrix."""
    if features.dim() != 2:
        raise ValueError(
            f"features: expected a (samples, dims) matrix, got shape {tuple(features.shape)}"
        )
    s = torch.linalg.svdvals(features.detach().double())
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def weight_norm(params: Iterable[torch.Tensor]) -> float:
    """L2 norm of all parameters taken together."""
    sq = sum(float(p.detach().double().pow(2).sum()) for p in params)
    return sq**0.5


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean entropy (nats) of the next-token distributions at the positions where ``mask`` is true."""
    logp = torch.log_softmax(logits.double(), dim=-1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    m = mask.bool()
    if not bool(m.any()):
        return 0.0
    return float(ent[m].mean())


def activation_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The MLP activation modules of a HF causal LM, in layer order."""
    found = [(n, m) for n, m in model.named_modules() if n.endswith(_ACTIVATION_SUFFIXES)]
    if not found:
        raise ValueError(
            f"model: no MLP activation module found (looked for names ending in {_ACTIVATION_SUFFIXES})"
        )
    return found


class ActivationCapture:
    """Context manager that records MLP activations of every forward pass.

    ``layers(mask)`` returns one ``(tokens, units)`` matrix per layer, keeping
    only the positions where ``mask`` (``(batch, seq)``) is true, so padding
    never counts as a silent unit.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = activation_modules(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._captured: list[list[torch.Tensor]] = [[] for _ in self._modules]

    def __enter__(self) -> ActivationCapture:
        for i, (_, module) in enumerate(self._modules):
            self._handles.append(module.register_forward_hook(self._hook(i)))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            self._captured[i].append(out.detach())

        return hook

    def layers(self, masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Activations of every captured forward pass, one mask per pass, concatenated per layer."""
        out: list[torch.Tensor] = []
        for i, chunks in enumerate(self._captured):
            if len(chunks) != len(masks):
                raise ValueError(f"layer {i}: {len(chunks)} forward passes but {len(masks)} masks")
            out.append(torch.cat([c[m.bool()] for c, m in zip(chunks, masks, strict=True)], dim=0))
        return out
