"""The policy store: which weights a policy version names, and where they live.

One owner for policy versions (``v<n>``), checkpoint names and formats, and
atomic writes. The base policy (version ``v0``) is a Hugging Face causal-LM
directory given by configuration (``policy.model_path``): the product never
builds or guesses one. Later versions are state-dict checkpoints under
``root``, each with its SHA-256 beside it.

Versions travel as records, never as a path convention: the trainer saves a
kept version here and publishes a :class:`PolicyVersion` (version, URI,
checksum, size) on the policies topic; the scorer loads that URI
(:func:`load_uri`, any fsspec URL; a shared volume's ``file://`` today) and
refuses weights whose checksum differs. :meth:`PolicyStore.prune` keeps the
newest versions and any still referenced.

The base policy may be given as a Hugging Face directory (safetensors) or as
a GGUF file (or a directory holding exactly one): a GGUF is dequantised on
first load and cached as a safetensors directory keyed by the file's SHA-256
(:func:`materialize_gguf`), so every later load, by either process, is a
plain fast ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
            "Hugging Face causal-LM directory or a GGUF file (the lab's `tapd build-policy` "
            "prepares one)"
        )


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` where a GPU is visible, else ``cpu``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def default_cache_dir() -> Path:
    """Where dequantised GGUF policies are cached: ``TAPD_POLICY_CACHE``, else the user's cache.

    Not the working directory: a ``tapd`` started elsewhere would convert the
    file again (tens of seconds) instead of loading the cached copy.
    """
    env = os.environ.get("TAPD_POLICY_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tapd" / "policy"


GGUF_MARKER = "tapd_gguf.json"  # written last: a cached directory without it is incomplete


def gguf_file(path: Path | str) -> Path | None:
    """The GGUF file ``path`` names (the file, or a directory with exactly one), else ``None``.

    A directory with a ``config.json`` is a Hugging Face checkpoint even if a
    GGUF lies beside it.
    """
    p = Path(path)
    if p.is_file() and p.suffix.lower() == ".gguf":
        return p
    if p.is_dir() and not (p / "config.json").exists():
        found = sorted(p.glob("*.gguf"))
        if len(found) > 1:
            names = ", ".join(f.name for f in found)
            raise ValueError(f"policy.model_path: {p} holds several GGUF files ({names}); name one")
        if found:
            return found[0]
    return None


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_cache_path(gguf: Path, cache_dir: Path | None = None) -> Path:
    """The cached safetensors directory of ``gguf``: keyed by content, not by name or place."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"gguf-{file_sha256(gguf)[:20]}"


def materialize_gguf(gguf: Path | str, cache_dir: Path | None = None) -> Path:
    """A Hugging Face safetensors directory with ``gguf``'s weights and tokenizer (cached).

    transformers loads a GGUF (``gguf_file=``) by dequantising it, but refuses
    to ``save_pretrained`` the result (it carries a ``quantization_config``);
    its state dict is copied into a fresh model of the same configuration
    without one, and that is saved, in float32. The directory is built beside
    its final place and renamed into it, so concurrent first loads (the scorer
    and the trainer start together) never see half a directory; the loser's
    copy is discarded.
    """
    gguf = Path(gguf)
    final = gguf_cache_path(gguf, cache_dir)
    if (final / GGUF_MARKER).exists():
        return final
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=final.name + ".tmp-"))
    try:
        src, name = str(gguf.parent), gguf.name
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        # strict: a name the fresh model does not have would be silently lost.
        fresh.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        fresh.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        marker = {
            "source": name,
            "sha256": file_sha256(gguf),
            "n_params": sum(p.numel() for p in fresh.parameters()),
        }
        (tmp / GGUF_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _install(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _install(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` into ``final``, unless a complete copy got there first."""
    if final.exists() and not (final / GGUF_MARKER).exists():
        # Damaged (no marker: not written by this function): set it aside, then replace it.
        stale = final.with_name(final.name + f".stale-{os.getpid()}")
        with contextlib.suppress(OSError):  # another process moved it first
            os.rename(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished first: use its copy
        if not (final / GGUF_MARKER).exists():
            raise


def resolve_policy_path(path: Path | str, cache_dir: Path | None = None) -> Path:
    """A Hugging Face directory for the policy at ``path`` (a GGUF is materialised first)."""
    gguf = gguf_file(path)
    return materialize_gguf(gguf, cache_dir) if gguf is not None else Path(path)


def load_policy(
    path: Path | str | None, device: str = "cpu", *, cache_dir: Path | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM and its tokenizer at ``path``, ready for left-padded generation.

    ``path`` is a Hugging Face causal-LM directory, a GGUF file, or a
    directory holding one GGUF file (dequantised once into ``cache_dir``).
    """
    if path is None:
        raise PolicyNotConfigured()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_policy_path(path, cache_dir)
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


POLICY_SCHEMA = "tapd.policy/1"


class ChecksumMismatch(ValueError):
    """Weights whose bytes are not the ones the trainer announced."""


@dataclass(frozen=True)
class PolicyVersion:
    """A kept policy version as announced on the policies topic (compacted by version)."""

    version: str
    uri: str
    sha256: str
    size_bytes: int
    ts: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": POLICY_SCHEMA,
            "version": self.version,
            "uri": self.uri,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "ts": self.ts,
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> PolicyVersion:
        """The record, or ``ValueError`` naming what is wrong with it."""
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"$: not JSON ({e})") from None
        if not isinstance(d, dict) or d.get("schema") != POLICY_SCHEMA:
            raise ValueError(f"schema: expected {POLICY_SCHEMA!r}")
        version = str(d.get("version", ""))
        if version_number(version) is None:
            raise ValueError(f"version: {version!r} is not v<n>")
        sha = str(d.get("sha256", ""))
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise ValueError("sha256: not a hex SHA-256")
        return cls(version, str(d["uri"]), sha, int(d.get("size_bytes", 0)), float(d.get("ts", 0)))


def load_uri(uri: str, sha256: str, map_location: Any = "cpu") -> dict[str, Any]:
    """The state dict at ``uri`` (any fsspec URL), after checking its SHA-256."""
    import fsspec
    import torch

    with fsspec.open(uri, "rb") as f:
        data = f.read()
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise ChecksumMismatch(f"sha256: {uri} has {got}, the announcement says {sha256}")
    return dict(torch.load(io.BytesIO(data), map_location=map_location, weights_only=True))


class PolicyStore:
    """Checkpoints of kept policy versions under one directory.

    ``policy-<n>.pt`` holds version ``v<n>``'s full state dict, written
    atomically (temporary file, fsync, rename): a crash leaves the old file
    or the new one, never half of one. ``policy-<n>.pt.sha256`` holds its
    checksum, written after it.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, n: int) -> Path:
        return self.root / f"policy-{n:06d}.pt"

    def _sum_path(self, n: int) -> Path:
        return self.path(n).with_name(self.path(n).name + ".sha256")

    def save(self, n: int, state: StateDict) -> Path:
        import torch

        path = self.path(n)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(dict(state), buf)
        data = buf.getvalue()
        _atomic_write(path, data)
        _atomic_write(self._sum_path(n), hashlib.sha256(data).hexdigest().encode())
        return path

    def describe(self, n: int) -> PolicyVersion | None:
        """Version ``v<n>`` as the trainer announces it (``None`` if not stored); the
        same record every time (``ts``: when the checkpoint was written)."""
        path = self.path(n)
        if not path.exists():
            return None
        try:
            sha = self._sum_path(n).read_text().strip()
        except OSError:
            sha = ""
        if len(sha) != 64:  # a checkpoint from before checksums: compute it once
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            _atomic_write(self._sum_path(n), sha.encode())
        st = path.stat()
        return PolicyVersion(version_name(n), path.resolve().as_uri(), sha, st.st_size, st.st_mtime)

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

    def prune(self, keep: int, protect: Iterable[int] = ()) -> list[int]:
        """Delete all but the newest ``keep`` versions and those in ``protect``;
        the versions deleted."""
        stored = self.versions()
        kept = set(stored[-keep:]) | set(protect)
        gone = [n for n in stored if n not in kept]
        for n in gone:
            self.path(n).unlink(missing_ok=True)
            self._sum_path(n).unlink(missing_ok=True)
        return gone

    def disk_bytes(self) -> int:
        """Bytes the stored checkpoints take (the disk-usage metric)."""
        if not self.root.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.root.glob("policy-*") if p.is_file())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
