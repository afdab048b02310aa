"""The policy store: which weights a policy version names, and where they live.

One owner for policy versions (``v<n>``), checkpoint names and formats, and
atomic writes. The trainer saves every kept version here; the scorer's
rollout engine loads the version a cohort was produced under. The base
policy (version ``v0``) is a Hugging Face causal-LM directory given by
configuration (``policy.model_path``): the product never builds or guesses
one. Later versions are state-dict checkpoints under ``root``.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

StateDict = Mapping[str, "torch.Tensor"]


def version_name(n: int) -> str:
    """The one spelling of policy (and model) version ``n``."""
    return f"v{n}"


def version_number(name: str) -> int | None:
    """``"v12"`` → 12; anything else (empty, malformed) → ``None``."""
    if len(name) > 1 and name[0] == "v" and name[1:].isdigit():
        return int(name[1:])
    return None


class PolicyNotConfigured(ValueError):
    """No base policy path: the product does not build one behind the user's back."""

    def __init__(self) -> None:
        super().__init__(
            "policy.model_path: no policy configured; set TAPD_POLICY__MODEL_PATH to a "
            "Hugging Face causal-LM directory (the lab's `tapd policy build` writes a tiny one)"
        )


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_policy(
    path: Path | str | None, device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and its tokenizer at ``path``, ready for left-padded generation."""
    if path is None:
        raise PolicyNotConfigured()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path))
    model.to(device)  # type: ignore[arg-type]
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.padding_side = "left"  # generation continues from the end of every row
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The text fed to the model: a chat model's template, or the raw task prompt.

    The rollout engine, the trainer and the probe all call this, so a chat
    model sees the same framing when sampled, trained and measured.
    """
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return str(text)
    return prompt


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An exact copy of every parameter and persistent buffer (what a revert restores)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def restore(model: torch.nn.Module, state: StateDict) -> None:
    import torch

    with torch.no_grad():
        model.load_state_dict(dict(state), strict=True)


class PolicyStore:
    """Checkpoints of kept policy versions under one directory.

    ``policy-<n>.pt`` holds version ``v<n>``'s full state dict, written
    atomically (temporary file, fsync, rename): a crash leaves the old file
    or the new one, never half of one.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, n: int) -> Path:
        return self.root / f"policy-{n:06d}.pt"

    def save(self, n: int, state: StateDict) -> Path:
        import torch

        path = self.path(n)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(dict(state), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def load(self, version: str | int, map_location: Any = "cpu") -> dict[str, Any] | None:
        """Version ``version``'s state dict, or ``None`` if it is not stored here."""
        import torch

        n = version if isinstance(version, int) else version_number(version)
        if n is None or not self.path(n).exists():
            return None
        return dict(torch.load(self.path(n), map_location=map_location, weights_only=True))

    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.glob("policy-*.pt"):
            digits = p.stem.removeprefix("policy-")
            if digits.isdigit():
                out.append(int(digits))
        return sorted(out)
