"""The learning-rate schedule of every vqakit training run: linear warm-up, then cosine decay to 0.

The cosine half of SGDR (Loshchilov & Hutter, 2017, https://arxiv.org/abs/1608.03983) without restarts, after a
linear warm-up as in BERT (Devlin et al., 2019) and ViLT.
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(total_steps: int, warmup_ratio: float):
    """The LR multiplier ``step -> factor``: ``(step + 1) / (warmup + 1)`` for the first
    ``warmup = int(warmup_ratio * total_steps)`` steps, then a cosine from 1 to 0 at ``total_steps`` (and 0 after).

    Example:
        >>> f = warmup_cosine(total_steps=10, warmup_ratio=0.2)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 10, 12)]
        [0.333, 0.667, 1.0, 0.5, 0.0, 0.0]
    """
    warmup = int(warmup_ratio * total_steps)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return schedule


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int,
                           warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` scaling every parameter group's LR by :func:`warmup_cosine`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup_ratio))
