"""Example: a plain TRL GRPO loop that keeps tapd's trainer contract.

Not tapd's trainer (``tapd trainer``): the shape a team that already has its
own loop (verl, OpenRLHF, prime-rl, TRL) copies. The loop owns the model and
the optimisation; :class:`daemon.contract.TrainerClient` owns the transport,
idempotency and dead letters; :class:`daemon.trainer.probe.Probe` measures
lift with the same definition as tapd's trainer (docs/TRAINER_CONTRACT.md).

    TAPD_POLICY__MODEL_PATH=... TAPD_POLICY__PROBE_PATH=... \\
        python -m lab.custom_trainer --max-cohorts 3

Settings come from the usual ``TAPD_*`` variables (transport, topics,
``trainer.group``, ``grpo.*``). Each update is kept and written to tapd's
policy store (``policy.store_path``) as version ``v<N>``, so the scorer's
rollouts sample from the policy being trained.
"""

from __future__ import annotations

import argparse
import json
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daemon.config import GRPOParams, TapdSettings, load_settings
from daemon.contract import Job, Measurement, TrainerClient
from daemon.policy.store import PolicyStore, format_prompt, load_policy, snapshot
from daemon.trainer.probe import Probe
from daemon.verify.registry import get_verifier
from streams.probes import read_probe_file


def reward(
    completions: Sequence[str],
    reference: Sequence[str],
    verifier: Sequence[str],
    verifier_args: Sequence[str],
    **_: Any,
) -> list[float | None]:
    """TRL reward function: each completion judged by its item's own verifier."""
    return [
        float(get_verifier(v, json.loads(a))(c, r))
        for c, r, v, a in zip(completions, reference, verifier, verifier_args, strict=True)
    ]


def grpo(model: Any, tok: Any, job: Job, params: GRPOParams, workdir: Path) -> list[float]:
    """Plain TRL: one ``GRPOTrainer`` over the cohort's prompts. Returns the
    mean reward logged at each step."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    rows = [
        {
            "prompt": format_prompt(tok, it.prompt),
            "reference": it.reference,
            "verifier": it.verifier,
            "verifier_args": json.dumps(it.verifier_args, sort_keys=True),
        }
        for it in job.dispatch.items
    ]
    prompts_per_step = min(len(rows), params.max_prompts_per_step)
    config = GRPOConfig(
        output_dir=str(workdir),
        num_generations=params.num_generations,
        per_device_train_batch_size=params.num_generations * prompts_per_step,
        max_completion_length=params.max_completion_length,
        learning_rate=params.learning_rate,
        optim=params.optimizer,
        beta=params.beta,
        max_steps=params.steps,
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    reward.__name__ = "verifier"  # TRL logs rewards under the function's name
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    trainer.train()
    model.eval()
    return [float(h["reward"]) for h in trainer.state.log_history if "reward" in h]


def run(settings: TapdSettings, max_cohorts: int | None, stop: threading.Event) -> int:
    """Train on dispatched cohorts until ``stop`` (or ``max_cohorts``); how many were reported."""
    p = settings.policy
    if p.probe_path is None:
        raise SystemExit("TAPD_POLICY__PROBE_PATH: lift is measured on a probe file")
    model, tok = load_policy(p.model_path)
    probe = Probe(
        read_probe_file(p.probe_path),
        get_verifier,
        format_prompt,
        max_new_tokens=settings.grpo.max_completion_length,
    )
    work = settings.state_dir / "custom-trainer"
    store = PolicyStore(settings.policy_store_dir())
    version = max(store.versions(), default=0)
    if version:
        model.load_state_dict(store.load(version) or {}, strict=True)
    reported = 0
    with TrainerClient.from_settings(settings, trainer_id="trl-example") as client:
        for job in client.jobs(stop):
            before = probe.measure(model, tok)
            try:
                rewards = grpo(model, tok, job, settings.grpo, work)
            except Exception as e:  # the contract: a cohort that cannot train is a dead letter
                client.reject(job, "items", f"training failed: {e!r}")
                continue
            after = probe.measure(model, tok)
            version += 1
            store.save(version, snapshot(model))  # atomic: the scorer may read it any time
            result = client.report(
                job,
                Measurement(
                    nll_before=before.nll,
                    nll_after=after.nll,
                    acc_before=before.accuracy,
                    acc_after=after.accuracy,
                    train_reward_before=rewards[0] if rewards else 0.0,
                    train_reward_after=rewards[-1] if rewards else 0.0,
                    policy_version_before=f"v{version - 1}",
                    policy_version_after=f"v{version}",
                    steps=len(rewards),
                ),
            )
            print(
                json.dumps(
                    {
                        "event": "lift_reported",
                        "cohort_id": result.cohort_id,
                        "nll_lift": round(result.nll_lift, 5),
                        "steps": result.steps,
                    }
                ),
                flush=True,
            )
            reported += 1
            if max_cohorts is not None and reported >= max_cohorts:
                break
    return reported


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-cohorts", type=int, default=None)
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run(load_settings(), args.max_cohorts, stop)


if __name__ == "__main__":
    main()
