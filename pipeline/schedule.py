"""The learning-rate schedule: Table 2's linear warm-up then a constant rate, or a decay to 0 for runs that must
end converged (a short fine-tune, the memorisation test)."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from pipeline.config import OptimConfig


def lr_factor(step: int, warmup_steps: int, decay_style: str = "constant", decay_steps: int = 0) -> float:
    """The learning rate of optimizer step `step` (from 0) as a share of the stage's rate.

    DeepSpeed's WarmupLR would warm up on a log curve by default; this is the paper's linear one.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_style == "constant":
        return 1.0
    done = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    if decay_style == "linear":
        return 1.0 - done
    if decay_style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"lr_decay_style must be constant, linear or cosine, not {decay_style!r}")


def lr_scheduler(optimizer: Optimizer, optim: OptimConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, optim.warmup_steps, optim.lr_decay_style,
                                                      optim.decay_steps))
