"""GRPO on SmolLM2-135M-Instruct on CPU: seconds per step and peak RSS, per configuration.

    .venv/bin/python -m bench.bench_grpo_real [--lora-rank 8] [--bf16] [--steps 3]
        [--prompts 4] [--k 4] [--tokens 32] [--slice basic_arithmetic/add_1d] [--out FILE]

One configuration per process, so that the peak RSS (``ru_maxrss``) is that
configuration's: the model load, the GRPO steps through the product's
trainer backend (``daemon.trainer.trl``: TRL's GRPOTrainer, LoRA through
peft when ``--lora-rank`` > 0, bf16 autocast with ``--bf16``) on a cohort of
one reasoning-gym slice with its own verifier. The baseline printed with it
is the same process's time for one forward pass over the step's
sequences, the floor of what a step costs. Needs a prepared SmolLM2
(``tapd build-policy --model smollm2``).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--optimizer", default="adamw_torch")
    ap.add_argument("--slice", default="basic_arithmetic/add_1d")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()

    import torch

    from daemon.config import GRPOParams
    from daemon.policy.store import format_prompt, load_policy
    from daemon.trainer.cohort import CohortReward
    from daemon.trainer.trl import grpo_train
    from daemon.verify.registry import get_verifier
    from lab import rg_tasks
    from lab.smollm2 import prepared_smollm2

    path = prepared_smollm2()
    if path is None:
        raise SystemExit("SmolLM2 is not prepared: run `tapd build-policy --model smollm2`")
    t0 = time.perf_counter()
    model, tok = load_policy(path)
    load_s = time.perf_counter() - t0
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tasks = rg_tasks.make_tasks(rg_tasks.get_slice(a.slice), a.prompts, seed=0)
    rows = [
        {
            "prompt": format_prompt(tok, t.prompt),
            "reference": t.reference,
            "verifier": t.verifier,
            "verifier_args": json.dumps(dict(t.verifier_args), sort_keys=True),
        }
        for t in tasks
    ]
    params = GRPOParams(
        num_generations=a.k,
        max_completion_length=a.tokens,
        steps=a.steps,
        learning_rate=a.lr,
        optimizer=a.optimizer,
        max_prompts_per_step=a.prompts,
        lora_rank=a.lora_rank,
        bf16_autocast=a.bf16,
    )
    # Baseline: one no-grad forward over the step's sequences (prompt + full completion).
    enc = tok([r["prompt"] for r in rows for _ in range(a.k)], return_tensors="pt", padding=True)
    ids = torch.cat([enc["input_ids"], enc["input_ids"][:, -a.tokens :]], dim=1)
    t1 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids)
    forward_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    outcome = grpo_train(model, tok, rows, CohortReward(get_verifier), params)
    train_s = time.perf_counter() - t2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "slice": a.slice,
        "lora_rank": a.lora_rank,
        "bf16_autocast": a.bf16,
        "optimizer": a.optimizer,
        "prompts_per_step": a.prompts,
        "k": a.k,
        "max_completion_length": a.tokens,
        "steps": outcome.steps,
        "train_seconds": round(train_s, 1),
        "seconds_per_step": round(train_s / max(outcome.steps, 1), 1),
        "steps_per_second": round(outcome.steps / train_s, 4),
        "forward_seconds_baseline": round(forward_s, 2),
        "load_seconds": round(load_s, 1),
        "rss_after_load_mib": round(rss_loaded),
        "peak_rss_mib": round(peak),
        "rewards": [round(r, 3) for r in outcome.rewards],
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result))
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with a.out.open("a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
