"""The step loss: per-task sums from the model, normalised by the targets of the whole global step."""

from __future__ import annotations

import torch


def step_loss(loss_sum: torch.Tensor, step_counts: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """This micro-batch's share of the step loss, normalised by the targets of the whole global step.

    token: sum_t w_t L_t / sum_t w_t N_t (one token mean over the global batch);
    task:  sum_t w_t (L_t / N_t) / sum_{t present} w_t (each task's mean, then weighted).
    Summing this over micro-batches and ranks gives the step's loss exactly.
    """
    if mode == "token":
        return (weights * loss_sum).sum() / (weights * step_counts).sum().clamp(min=1)
    if mode == "task":
        present = (step_counts > 0).to(weights.dtype)
        return (weights * loss_sum / step_counts.clamp(min=1)).sum() / (weights * present).sum().clamp(min=1e-12)
    raise ValueError(f"loss_normalisation must be 'token' or 'task', not {mode!r}")
