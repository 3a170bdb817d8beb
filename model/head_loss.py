"""Cross-entropy of a vocabulary head at its target positions, a bounded number of targets at a time.

A flat all-text micro-batch of 2 x 4096 tokens has 8,192 targets of the 102,400-wide LM head: 3.4 GB of fp32
logits, and ~12 bytes a logit at the backward's peak (logits, the log-softmax cross-entropy saves, their
gradients). Here the targets go through the head in chunks of at most `LOGITS_CHUNK_BYTES` of fp32 logits; each
chunk keeps only its per-target losses, and its logits are recomputed in the backward (non-reentrant
`torch.utils.checkpoint`), so the peak is a few chunks' logits whatever the number of targets.

The head is called as a module on each chunk (never its weight read directly): DeepSpeed ZeRO-3 gathers a
module's parameters in its forward hooks, the recomputation included. Non-reentrant checkpointing keeps one
autograd graph, so each parameter's gradient is summed over the chunks and accumulated once, as without chunks.

The number of chunks comes from the micro-batch's shape (its positions, a bound on its targets), never from how
many targets it has: ZeRO-3 records the order in which modules run and, while each step repeats it, keeps a
weight gathered between uses that follow closely (the head's, chunk after chunk). A count that changed with the
targets would change that order from one micro-batch to the next, invalidating the trace, and the 0.8 GB LM head
of the 7B would be gathered again for every chunk. So a micro-batch with few targets runs the same number of
(smaller, possibly empty) chunks, and one without any runs them empty: the ZeRO-3 rule that every module runs
in every forward holds with the same calls. Sizes come from host-known shapes only: no host sync.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

LOGITS_CHUNK_BYTES = 256 * 2**20  # bounds the fp32 logits of one chunk of targets (the recomputed unit)
FP32 = 4


def chunk_targets(vocab: int) -> int:
    """Targets per chunk: as many as keep one chunk's fp32 logits within the bound (at least one). The bound is
    read at each call, so a test can lower it."""
    return max(1, LOGITS_CHUNK_BYTES // (FP32 * vocab))


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def head_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, vocab: int,
              max_targets: int) -> torch.Tensor:
    """[N] cross-entropy of `head(hidden)` ([N, D] -> [N, vocab]) against `targets` ([N]), in chunks of targets.

    Equal to `F.cross_entropy(head(hidden).float(), targets, reduction="none")`, losses and gradients.
    `max_targets`: the most targets a micro-batch of this shape can have (its positions); it alone sets the number
    of chunks, each within the bound since N <= max_targets."""
    chunks = max(1, math.ceil(max_targets / chunk_targets(vocab)))
    if chunks == 1:
        # One chunk is already bounded: nothing to gain from recomputing it.
        return _chunk_loss(head, hidden, targets)
    n = hidden.shape[0]
    sizes = [n // chunks + (i < n % chunks) for i in range(chunks)]
    # split (not slicing in a loop): its backward is one concatenation of the chunks' gradients, where a slice's
    # is a full-size zero tensor per chunk. preserve_rng_state=False: the heads draw no random numbers, and saving
    # the generators' state costs each chunk. determinism_check="none": under ZeRO-3 a frozen head's weight is a
    # partitioned parameter, gathered again by the module's hooks for the recomputation, and the metadata check
    # failed on it (CheckpointError, 2 CPU ranks, Stage I at 1b width, where the LM head is frozen); the gradients
    # are the unchunked loss's (6e-7 relative, ZeRO-3 on one CPU rank, Stage I's frozen LM head, ~20 chunks).
    return torch.cat([checkpoint(_chunk_loss, head, h, t, use_reentrant=False, preserve_rng_state=False,
                                 determinism_check="none")
                      for h, t in zip(hidden.split(sizes), targets.split(sizes), strict=True)])
