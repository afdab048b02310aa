"""Teacher-forced rows: a prompt's token ids followed by an answer's, in one batch.

The two places that measure how likely the policy finds an answer encode it
the same way, here: the trainer's probe (the lift, ``daemon.trainer.probe``)
and ``update_alignment``'s gradients (``daemon.policy.alignment``). An answer
measured by one and not the other would make the feature and the label
disagree about which tokens count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_rows(
    seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded token ids, attention mask, and answer mask of each row.

    ``seqs[r]`` is prompt + answer token ids and ``starts[r]`` where the
    answer begins; the answer mask is True on the answer's tokens (position t
    is predicted by position t - 1: callers shift it).
    """
    if not seqs:
        raise ValueError("seqs: at least one row is needed")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id if pad_id is not None else 0, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    answer = torch.zeros((len(seqs), width), dtype=torch.bool)
    for r, (s, a0) in enumerate(zip(seqs, starts, strict=True)):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        attn[r, : len(s)] = 1
        answer[r, a0 : len(s)] = True
    return ids, attn, answer
