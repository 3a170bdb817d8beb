"""Attention backends for packed rows, chosen by one option (`attention`).

- `sdpa`: PyTorch SDPA with a block-diagonal causal mask built from the restarting `position_ids`
  (model/janus.py's `packed_causal_mask`; CPU, tests, and a reference).
- `flash_attention_2`: the flash-attn package through transformers (packed rows are found from
  `position_ids`); needs `pip install -e '.[gpu]'`.
- `varlen`: PyTorch's own varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`), registered
  with transformers' attention interface, for CUDA machines without flash-attn. It reads the packed
  segment boundaries (`cu_seq_lens_q`, `max_length_q`) that the model passes through.
"""

from __future__ import annotations

import inspect
from typing import Literal, get_args

import torch
from transformers import AttentionInterface

Backend = Literal["sdpa", "flash_attention_2", "varlen"]
BACKENDS: tuple[str, ...] = get_args(Backend)


def _causal_kwargs(fn) -> dict:
    """Causality made explicit for whichever `varlen_attn` this torch has.

    Releases up to 2.9 took `is_causal`; newer ones take `window_size`, whose default (-1, -1) is
    *full* attention, so relying on defaults would silently train a non-causal model.
    """
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        return {"window_size": (-1, 0)}
    if "is_causal" in params:
        return {"is_causal": True}
    raise RuntimeError("torch.nn.attention.varlen.varlen_attn takes neither window_size nor is_causal")


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: q/k/v [B, H, T, D] -> [B, T, H, D]."""
    from torch.nn.attention.varlen import varlen_attn

    cu_seqlens, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None:
        raise ValueError("the varlen backend needs cu_seq_lens_q/max_length_q from the packed batch")
    batch, heads, seq, dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: repeat key/value heads
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, heads, dim) for t in (query, key, value))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    out = varlen_attn(q, k, v, cu, cu, int(max_len), int(max_len), scale=scaling, **_causal_kwargs(varlen_attn))
    return out.view(batch, seq, heads, dim), None


def use_attention(model: torch.nn.Module, backend: str) -> None:
    """Switch the language model of a Janus model to `backend` (SigLIP keeps its own)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "varlen":
        AttentionInterface.register("varlen", varlen_attention_forward)
    if backend == "flash_attention_2":
        import flash_attn  # noqa: F401  (a clear ImportError now beats one deep inside the first step)
    model.model.language_model.config._attn_implementation = backend
