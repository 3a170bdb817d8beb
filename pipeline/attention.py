"""Attention backends for packed rows, chosen by one option (`attention`).

- `sdpa`: PyTorch SDPA called once per packed sample, causal, without a mask (`packed_sdpa_forward`): the work
  of each sample's own square, not the micro-batch's (a flat 5,200-token micro-batch of 600-token samples is ~9x
  less attention than one masked square); any device, the CPU's (tests, the demo), and a reference.

Generation (a sample grid: left-padded prompts, a KV cache) is not a packed forward: it runs under transformers'
own sdpa whatever the backend (`transformers_attention`).
- `flash_attention_2`: the flash-attn package through transformers (packed rows are found from
  `position_ids`); needs `pip install -e '.[gpu]'`.
- `varlen`: PyTorch's own varlen flash kernel (`torch.nn.attention.varlen.varlen_attn`), registered
  with transformers' attention interface, for CUDA machines without flash-attn. It reads the packed
  segment boundaries (`cu_seq_lens_q`, `max_length_q`) that the model passes through.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

Backend = Literal["sdpa", "flash_attention_2", "varlen"]
BACKENDS: tuple[str, ...] = get_args(Backend)


def default_attention() -> str:
    """The training default: on CUDA the varlen flash kernel (flash-attn's where it imports), `sdpa` on the CPU.

    `sdpa` runs one SDPA per packed sample (or transformers' sdpa under a block-diagonal mask): on a GPU that is one
    small kernel per sample and layer, or the whole micro-batch's square, so it is the CPU's and the reference path.
    """
    if not torch.cuda.is_available():
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except Exception:  # not installed, or built for another torch/CUDA
        return "varlen"
    return "flash_attention_2"


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


def with_query_heads(kv: torch.Tensor, heads: int) -> torch.Tensor:
    """Grouped-query attention's key or value [B, H_kv, T, D] repeated to the query's `heads`."""
    return kv if kv.shape[1] == heads else kv.repeat_interleave(heads // kv.shape[1], dim=1)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def kernel_dtype(query: torch.Tensor, value: torch.Tensor) -> torch.dtype:
    """The one dtype a flash kernel gets q, k and v in (it takes only one, of fp16/bf16): autocast's when autocast
    is on (an fp32 model under bf16 autocast hands over fp32 q and k, RoPE's fp32 cos promoting them, with bf16 v),
    else the half dtype the values (the module's weights) are in. fp32 without autocast is refused."""
    device = query.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
    else:
        dtype = value.dtype
    if dtype not in HALF_DTYPES:
        raise TypeError(f"the varlen backend's flash kernel takes only fp16 or bf16, not {dtype}: run the model in "
                        "bf16, or under torch.autocast(dtype=torch.bfloat16), or use --attention sdpa")
    return dtype


def varlen_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             attention_mask: torch.Tensor | None, scaling: float | None = None,
                             dropout: float = 0.0, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: q/k/v [B, H, T, D] -> [B, T, H, D]."""
    from torch.nn.attention.varlen import varlen_attn

    cu_seqlens, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu_seqlens is None:
        raise ValueError("the varlen backend needs cu_seq_lens_q/max_length_q from the packed batch")
    batch, heads, seq, dim = query.shape
    dtype = kernel_dtype(query, value)
    key, value = with_query_heads(key, heads), with_query_heads(value, heads)
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, heads, dim).to(dtype) for t in (query, key, value))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    out = varlen_attn(q, k, v, cu, cu, int(max_len), int(max_len), scale=scaling, **_causal_kwargs(varlen_attn))
    return out.view(batch, seq, heads, dim), None


PACKED_SDPA = "packed_sdpa"  # the registered name of the `sdpa` backend's attention function


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: q/k/v [B, H, T, D] -> [B, T, H, D], SDPA once per packed sample,
    split by the batch's `segment_lengths` (a host-side tuple: splitting reads nothing from the device)."""
    lengths = kwargs.get("segment_lengths")
    if lengths is None:
        raise ValueError("the sdpa backend needs segment_lengths from the packed batch")
    batch, heads, seq, dim = query.shape
    key, value = with_query_heads(key, heads), with_query_heads(value, heads)
    # [B, H, T, D] -> [H, B*T, D]: segments are spans of the flattened tokens (cu_seqlens' convention)
    q, k, v = (t.transpose(0, 1).reshape(heads, batch * seq, dim) for t in (query, key, value))
    parts = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, scale=scaling)[0]
             for qs, ks, vs in zip(q.split(lengths, 1), k.split(lengths, 1), v.split(lengths, 1), strict=True)]
    return torch.cat(parts, 1).view(heads, batch, seq, dim).permute(1, 2, 0, 3), None


def use_attention(model: torch.nn.Module, backend: str) -> None:
    """Switch the language model of a Janus model to `backend` (SigLIP keeps its own)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    implementation = backend
    if backend == "sdpa":
        AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
        implementation = PACKED_SDPA
    if backend == "varlen":
        AttentionInterface.register("varlen", varlen_attention_forward)
    if backend == "flash_attention_2":
        import flash_attn  # noqa: F401  (a clear ImportError now beats one deep inside the first step)
    model.model.language_model.config._attn_implementation = implementation


@contextlib.contextmanager
def transformers_attention(model: torch.nn.Module) -> Iterator[None]:
    """The language model on transformers' own sdpa while inside: for generation, whose left-padded prompts and KV
    cache need transformers' masks, not a packed batch's segments."""
    config = model.model.language_model.config
    backend, config._attn_implementation = config._attn_implementation, "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = backend
