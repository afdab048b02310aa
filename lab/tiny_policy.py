"""The lab's tiny policy: a GPT-2 the project pretrains itself.

The tiny policy is what makes the whole loop run on a bare CPU box with
nothing to download: a ~0.1M-parameter GPT-2 over the character tokenizer,
pre-trained by supervised next-token training on the task battery's
*training partition only* (:func:`lab.tasks.in_probe_partition`): no probe
prompt is ever seen, so the probe measures what the policy generalizes.

The organism, and why each part is there:

* **Tiers by family** (:data:`lab.tasks.TIERS`). ``easy`` and ``frontier``
  families are shown (frontier ones with more weight: their answers must
  generalize to unseen prompts), ``hard`` ones never (no foothold: all-wrong
  groups give GRPO no gradient).
* **A slip per subject, its own mark.** A share of a family's examples end
  with a stray mark before ``<eos>`` ("82#"), drawn afresh each time an
  example is sampled, so the policy learns "end an answer of this subject
  with ``<eos>`` or with its mark" as one prompt-independent habit. Strict
  verifiers reject the mark, so GRPO on a cohort whose attempts disagree
  lowers the slip for held-out prompts too: a rule half learnt, fixable from
  the reward alone, which is what the disagreement signal is meant to find.
  Every subject has its own mark (``slip_marks``): fixing the ``add`` habit
  does not fix ``sub``'s, so a cohort's lift lands on its own target, not
  on every subject at once (with one shared mark, training on any subject
  taught every subject alike).
* **Frontier-ness that varies continuously.** The slip share differs by
  family (``family_slips``; easy families slip rarely), and the answer
  competence on unseen prompts differs by family too, so sampled accuracy
  spreads over the frontier families instead of sitting at one level.

Measured with ``tapd build-policy --competence`` (greedy and sampled accuracy
and disagreement per family on probe-partition prompts) and, for the lift,
``pytest -s tests/trainer/test_trainer.py`` (docs/TRAINER.md).

Builds are deterministic for (config, seed) and cached in a directory keyed by
a hash of both, written atomically (built in a temporary directory, then
renamed), so the scorer and trainer processes share one build.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from daemon.policy.store import format_prompt, weights_hash
from daemon.verify.registry import get_verifier
from lab import tasks as tasklib
from lab.tokenizer import build_char_tokenizer


def default_cache_dir() -> Path:
    """Where built policies live: ``TAPD_POLICY_CACHE``, else the user's cache.

    Not the working directory: a ``tapd`` started elsewhere would rebuild
    the policy (minutes) instead of loading it.
    """
    env = os.environ.get("TAPD_POLICY_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tapd" / "policy"


BUILD_MARKER = "tapd_policy.json"


@dataclass(frozen=True)
class TinyPolicyConfig:
    """Everything that determines the built weights (with the seed)."""

    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_positions: int = 32
    steps: int = 1500
    batch_size: int = 128
    lr: float = 5e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01
    # Sampling weight of a family's examples by its tier; hard families are
    # never shown. ``family_weights`` ("subject/difficulty") overrides a tier's
    # weight where a skill is slower to learn: the values were tuned by
    # measuring competence_report() so that every frontier family lands in
    # the disagreeing middle.
    tier_weights: Mapping[str, float] = field(
        default_factory=lambda: {"easy": 1.0, "frontier": 0.6, "hard": 0.0}
    )
    family_weights: Mapping[str, float] = field(
        default_factory=lambda: {
            "add/2d_nocarry": 1.0,
            "add/2d_carry": 1.0,
            "sub/2d_noborrow": 1.5,
            "sub/2d_borrow": 1.5,
            "mul/2x1": 2.5,
            "compare/3d": 0.3,
        }
    )
    pool_per_family: int = 4000
    # The slip: a share of a family's examples end with the subject's own
    # slip mark before <eos> ("82#"), drawn afresh each time an example is
    # sampled, so it is one prompt-independent habit per subject rather than
    # a memorized fact (see the module doc). ``family_slips`` overrides the
    # tier's share per family, so that frontier-ness varies across families.
    tier_slips: Mapping[str, float] = field(
        default_factory=lambda: {"easy": 0.0, "frontier": 0.4, "hard": 0.0}
    )
    family_slips: Mapping[str, float] = field(default_factory=dict)
    slip_marks: Mapping[str, str] = field(
        default_factory=lambda: {"add": "#", "sub": "$", "mul": "&", "compare": "@", "digits": "%"}
    )
    # Which prompts pretraining may see: "train" keeps the probe partition
    # (and so every probe item) unseen.
    split: str = "train"
    threads: int = 1  # fixed: CPU matmul reduction order depends on the thread count

    def key(self) -> str:
        data = json.dumps(asdict(self), sort_keys=True, default=dict)
        return hashlib.sha256(data.encode()).hexdigest()[:12]


@contextmanager
def _deterministic(seed: int, threads: int) -> Iterator[None]:
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det)


def family_slip(cfg: TinyPolicyConfig, subject: str, difficulty: str) -> float:
    """The share of a family's pretraining examples that end with its subject's slip mark."""
    tier = tasklib.TIERS[(subject, difficulty)]
    return float(cfg.family_slips.get(f"{subject}/{difficulty}", cfg.tier_slips.get(tier, 0.0)))


def _sft_pool(
    cfg: TinyPolicyConfig, seed: int
) -> tuple[list[str], list[str], list[float], list[float], list[str]]:
    """Prompts, answers, sampling weights, slip probability and slip mark per example."""
    prompts: list[str] = []
    answers: list[str] = []
    weights: list[float] = []
    slips: list[float] = []
    marks: list[str] = []
    for (subject, difficulty), tier in tasklib.TIERS.items():
        w = cfg.family_weights.get(f"{subject}/{difficulty}", cfg.tier_weights.get(tier, 0.0))
        if w <= 0:
            continue
        slip = family_slip(cfg, subject, difficulty)
        mark = cfg.slip_marks[subject]
        # Only the training partition: every probe prompt stays unseen, so
        # the probe measures what the policy generalizes, not what it recalls.
        for t in tasklib.make_tasks(
            subject,
            difficulty,
            cfg.pool_per_family,
            seed,
            split=cfg.split,  # type: ignore[arg-type]
        ):
            prompts.append(t.prompt)
            answers.append(t.reference)
            weights.append(w)
            slips.append(slip)
            marks.append(mark)
    return prompts, answers, weights, slips, marks


def slipped(answer: str, mark: str) -> str:
    """The slip: the answer with a stray mark that strict verifiers reject."""
    return answer + mark


def _encode_pool(
    tok: PreTrainedTokenizerBase, prompts: Sequence[str], answers: Sequence[str], n_positions: int
) -> list[tuple[list[int], int]]:
    """``<bos> prompt answer <eos>`` ids with the prompt length, tokenized once up front."""
    eos = int(tok.eos_token_id)
    p_ids = tok(list(prompts))["input_ids"]
    a_ids = tok(list(answers), add_special_tokens=False)["input_ids"]
    return [((p + a + [eos])[:n_positions], len(p)) for p, a in zip(p_ids, a_ids, strict=True)]


def _batch(
    rows: Sequence[tuple[list[int], int]], pad: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and labels with the loss on answer and eos only."""
    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        row = torch.tensor(ids)
        ids_t[i, : len(ids)] = row
        att[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = row[n_prompt:]
    return ids_t, att, labels


def train_tiny_policy(
    cfg: TinyPolicyConfig, seed: int
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """Build and pre-train the tiny policy in memory (deterministic for cfg and seed)."""
    tok = build_char_tokenizer(model_max_length=cfg.n_positions)
    with _deterministic(seed, cfg.threads):
        gcfg = GPT2Config(
            vocab_size=len(tok),
            n_positions=cfg.n_positions,
            n_embd=cfg.n_embd,
            n_layer=cfg.n_layer,
            n_head=cfg.n_head,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            # Eager attention is faster than SDPA at these sizes on a CPU.
        )
        gcfg._attn_implementation = "eager"
        model = GPT2LMHeadModel(gcfg)
        prompts, answers, weights, slips, marks = _sft_pool(cfg, seed)
        pool = _encode_pool(tok, prompts, answers, cfg.n_positions)
        slip_pool = _encode_pool(
            tok,
            prompts,
            [slipped(a, m) for a, m in zip(answers, marks, strict=True)],
            cfg.n_positions,
        )
        pad = int(tok.pad_token_id)
        rng = random.Random(f"tapd.policy.sft|{seed}")
        slip_rng = random.Random(f"tapd.policy.slip|{seed}")
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt,
            lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * max(0.0, 1.0 - s / max(1, cfg.steps)),
        )
        model.train()
        idx = list(range(len(prompts)))
        for _ in range(cfg.steps):
            batch = rng.choices(idx, weights=weights, k=cfg.batch_size)
            rows = [
                slip_pool[i] if slips[i] > 0 and slip_rng.random() < slips[i] else pool[i]
                for i in batch
            ]
            ids, att, labels = _batch(rows, pad)
            loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
        model.eval()
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.max_new_tokens = 12
    return model, tok


def policy_dir(cache_dir: Path, seed: int, cfg: TinyPolicyConfig) -> Path:
    return Path(cache_dir) / f"tiny-{cfg.key()}-s{seed}"


def build_tiny_policy(
    cache_dir: Path | None = None, seed: int = 0, cfg: TinyPolicyConfig | None = None
) -> Path:
    """An HF-loadable directory with the tiny policy and its tokenizer, built once."""
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    cfg = cfg or TinyPolicyConfig()
    final = policy_dir(cache_dir, seed, cfg)
    if (final / BUILD_MARKER).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok = train_tiny_policy(cfg, seed)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the build from other users
    try:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        marker = {
            "seed": seed,
            "config": asdict(cfg),
            "weights_sha256": weights_hash(model),
            "n_params": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.perf_counter() - t0, 2),
        }
        (tmp / BUILD_MARKER).write_text(json.dumps(marker, indent=2, default=dict))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process finished the same build first: theirs is identical.
            if not (final / BUILD_MARKER).exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_info(path: Path) -> dict[str, Any]:
    return dict(json.loads((Path(path) / BUILD_MARKER).read_text()))


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    k: int,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 12,
    seed: int = 0,
) -> list[list[str]]:
    """``k`` completions per prompt; ``temperature=0`` means greedy."""
    texts = [format_prompt(tokenizer, p) for p in prompts for _ in range(k)]
    enc = tokenizer(texts, return_tensors="pt", padding=True).to(model.device)
    torch.manual_seed(seed)
    out = model.generate(  # type: ignore[operator]
        **enc,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_k=0 if temperature > 0 else None,
        top_p=1.0 if temperature > 0 else None,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    new = out[:, enc["input_ids"].shape[1] :]
    decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
    return [decoded[i * k : (i + 1) * k] for i in range(len(prompts))]


@dataclass(frozen=True)
class Competence:
    greedy: float  # greedy accuracy
    sampled: float  # mean reward of temperature-1 samples
    disagree: float  # fraction of prompts whose k samples are neither all right nor all wrong


def competence_report(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    seed: int = 0,
    *,
    n: int = 32,
    k: int = 8,
    families: Sequence[tuple[str, str]] | None = None,
) -> dict[tuple[str, str], Competence]:
    out: dict[tuple[str, str], Competence] = {}
    for subject, difficulty in families or list(tasklib.FAMILIES):
        batch = tasklib.make_tasks(subject, difficulty, n, seed, split="probe")
        greedy = sample_completions(model, tokenizer, [t.prompt for t in batch], 1, temperature=0)
        samples = sample_completions(model, tokenizer, [t.prompt for t in batch], k, seed=seed)
        g_right = 0.0
        s_right = 0.0
        disagree = 0
        for t, g, s in zip(batch, greedy, samples, strict=True):
            verify = get_verifier(t.verifier, t.verifier_args)
            g_right += verify(g[0], t.reference)
            rewards = [verify(c, t.reference) for c in s]
            s_right += sum(rewards)
            disagree += int(0 < sum(rewards) < k)
        out[(subject, difficulty)] = Competence(
            greedy=g_right / n, sampled=s_right / (n * k), disagree=disagree / n
        )
    return out


def competence_table(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, seed: int = 0, n: int = 32
) -> dict[tuple[str, str], float]:
    """Sampled (temperature 1) accuracy per (subject, difficulty) on probe-partition tasks."""
    return {k: v.sampled for k, v in competence_report(model, tokenizer, seed, n=n).items()}


def lab_policy_env(workdir: Path, probe_size: int = 16, seed: int = 0) -> dict[str, str]:
    """``TAPD_POLICY__*`` variables that point a tapd process at the lab's policy and probe.

    Builds (or finds) the tiny policy and writes the arithmetic probe file
    into ``workdir``: the explicit inputs the product needs.
    """
    from lab.tasks import write_probe

    path = build_tiny_policy(seed=seed)
    probe = write_probe(Path(workdir) / f"probe-{probe_size}.jsonl", probe_size, seed=0)
    return {"TAPD_POLICY__MODEL_PATH": str(path), "TAPD_POLICY__PROBE_PATH": str(probe)}
