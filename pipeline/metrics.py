"""Every figure a training log or benchmark prints: FLOPs, MFU/HFU, tokens/s, packing efficiency.

FLOPs of one training step (what MFU divides by), counted per matrix multiply
----------------------------------------------------------------------------
A weight matrix of N = in x out elements applied to n rows costs 2*N*n FLOPs forward. Backward
costs another 2*N*n for the weight gradient (only if the weight trains) and another 2*N*n for the
input gradient (only if anything before it trains, i.e. its input needs a gradient):

    flops(matrix) = 2 * N * n * (1 + [weight trains] + [input needs grad])

This is the usual rule written per matrix: 6N per use for trainable weights inside the graph, 4N
for frozen weights that gradients flow through (the frozen LLM in Stage I, since the adaptors
before it train), 2N for forward-only weights (a frozen SigLIP). It is also 4N, not 6N, for a
trainable matrix whose input needs no gradient (the und. adaptor's first layer behind a frozen
SigLIP, SigLIP's patch embedding): autograd does not compute that input gradient, so neither do we.
Biases, norms, activations, RoPE, softmax and the loss are not counted (a few % of a 1B layer).
Embedding lookups cost 0. The VQ encoder is not in the training forward (it runs in preprocessing):
0. `n` is always a count of *real* uses, never of padded positions:

    LLM layers (q, k, v, o, gate, up, down)  n = real tokens            (pad tokens never count)
    LM head (D x vocab)                      n = text-target positions  (the head runs only there)
    gen. head (D x D', D' x 16384)           n = image-target positions
    gen. adaptor (8 x D, D x D)              n = generation image positions (576 per image)
    SigLIP layers + patch embedding          n = 576 patches per understanding image
    und. adaptor (1024 x D, D x D)           n = 576 per understanding image

Attention (no weights). Per layer, for a causal segment of length L and attention width
D = heads * head_dim: scores Q K^T are L*L*D multiply-adds and P V another L*L*D, i.e. 2*2*L*L*D
FLOPs for the full square; causality keeps half of it:

    forward = 2 * D * L**2          backward = 2 * forward (dQ, dK from dS; dV, dP)

so 3 * 2 * D * L**2 per layer where gradients flow, 1x where forward-only. Summed over the real
segments of the batch (the padding tail of a row is a segment of its own and is left out), so the
batch enters only through sum(L**2). SigLIP attention is bidirectional over 576 patches: forward
4 * w * 576**2 per layer and image, x3 when SigLIP trains.

HFU adds what gradient checkpointing recomputes: one more forward of every checkpointed layer whose
backward runs (every LLM decoder layer when a gradient flows through the LLM; SigLIP's layers when
it trains), attention included, *less the layer's last matmul* (Llama's down_proj, SigLIP's fc2):
PyTorch's non-reentrant checkpoint stops recomputing once the last tensor the backward needs is back
(early stop, on by default), and nothing saves that matmul's output. Measured with FlopCounterMode
(tests/unit/test_metrics.py). Heads and adaptors are not checkpointed.

MFU = model FLOPs / (seconds * GPUs * peak FLOP/s); HFU = (model + recompute) / the same.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass, fields

import torch
from transformers import JanusConfig

from model.batch import IGNORE, PackedBatch


@dataclass(frozen=True)
class BatchCounts:
    """What FLOPs and throughput depend on, for one micro-batch or a sum of them (all ints, so summable
    and all-reducible as one tensor)."""

    rows: int = 0
    row_tokens: int = 0        # rows * seq_len, padding included
    real_tokens: int = 0       # positions with task >= 0
    samples: int = 0           # real segments
    segment_sq_sum: int = 0    # sum of L**2 over real segments (attention)
    text_targets: int = 0      # LM-head positions
    image_targets: int = 0     # gen-head positions
    und_images: int = 0        # SigLIP runs
    gen_image_tokens: int = 0  # gen. adaptor positions

    def __add__(self, other: BatchCounts) -> BatchCounts:
        return BatchCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """int64 tensor, for `dist.all_reduce` across ranks."""
        return torch.tensor(astuple(self), dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> BatchCounts:
        return cls(*(int(v) for v in values.tolist()))


def real_segment_lengths(batch: PackedBatch) -> list[int]:
    """Lengths of the packed samples, from cu_seqlens, without the padding-tail segments."""
    cu = batch.cu_seqlens.tolist()
    task = batch.task.reshape(-1)
    return [end - start for start, end in zip(cu[:-1], cu[1:], strict=True) if task[start] >= 0]


def batch_counts(batch: PackedBatch) -> BatchCounts:
    """The counts of one packed batch."""
    lengths = real_segment_lengths(batch)
    return BatchCounts(
        rows=batch.task.shape[0],
        row_tokens=batch.task.numel(),
        real_tokens=int((batch.task >= 0).sum()),
        samples=len(lengths),
        segment_sq_sum=sum(n * n for n in lengths),
        text_targets=int((batch.text_targets != IGNORE).sum()),
        image_targets=int((batch.image_targets != IGNORE).sum()),
        und_images=int(batch.pixel_values.shape[0]),
        gen_image_tokens=int(batch.gen_input_ids.numel()),
    )


def packing_efficiency(batch: PackedBatch) -> float:
    """Real tokens / row tokens (task >= 0 marks a real token; -1 is row padding)."""
    return float((batch.task >= 0).float().mean()) if batch.task.numel() else 0.0


@dataclass(frozen=True)
class Flops:
    """FLOPs of one training step (forward + backward), per part; `recompute` is checkpointing's extra forward."""

    parts: dict[str, float]
    recompute: dict[str, float]

    @property
    def model(self) -> float:
        return sum(self.parts.values())

    @property
    def hardware(self) -> float:
        return self.model + sum(self.recompute.values())


def _matmul(weight_elements: float, uses: float, trains: bool, input_grad: bool) -> float:
    """2*N*n forward, + 2*N*n weight gradient if it trains, + 2*N*n input gradient if one is needed."""
    return 2.0 * weight_elements * uses * (1 + int(trains) + int(input_grad))


def _llm_layer_weights(config: JanusConfig) -> tuple[int, int]:
    """(matmul weight elements of one decoder layer, attention width heads * head_dim)."""
    t = config.text_config
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    q_width = t.num_attention_heads * head_dim
    kv_width = t.num_key_value_heads * head_dim
    attention = t.hidden_size * (2 * q_width + 2 * kv_width)  # q, o (q_width) and k, v (kv_width)
    mlp = 3 * t.hidden_size * t.intermediate_size            # gate, up, down
    return attention + mlp, q_width


def _siglip_shapes(config: JanusConfig) -> tuple[int, int, int, int]:
    """(patches per image, patch-embedding weight elements, matmul elements of one layer, width)."""
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    width, mlp = v.hidden_size, int(v.hidden_size * v.mlp_ratio)
    return patches, v.num_channels * v.patch_size ** 2 * width, 4 * width * width + 2 * width * mlp, width


def llm_gets_gradient(counts: BatchCounts, trainable: tuple[str, ...] | list[str]) -> bool:
    """Whether a backward runs through the LLM: it trains, or a trained adaptor feeds it in this batch."""
    und_path = bool({"und_encoder", "und_adaptor"} & set(trainable)) and counts.und_images > 0
    gen_path = bool({"gen_embedding", "gen_adaptor"} & set(trainable)) and counts.gen_image_tokens > 0
    return "llm" in trainable or und_path or gen_path


def training_flops(counts: BatchCounts, config: JanusConfig, trainable: tuple[str, ...] | list[str],
                   checkpointing: bool = False) -> Flops:
    """FLOPs of forward + backward over `counts` for the parts in `trainable` (see the module docstring)."""
    tr = set(trainable)
    t, q = config.text_config, config.vq_config
    D = t.hidden_size
    llm_grad = llm_gets_gradient(counts, trainable)
    siglip_trains, und_adaptor_trains = "und_encoder" in tr, "und_adaptor" in tr
    gen_embed_trains, gen_adaptor_trains, gen_head_trains = "gen_embedding" in tr, "gen_adaptor" in tr, "gen_head" in tr

    patches, patch_weights, siglip_layer, width = _siglip_shapes(config)
    und_positions = counts.und_images * patches
    siglip_layers = config.vision_config.num_hidden_layers
    siglip_attention_fwd = siglip_layers * counts.und_images * 4.0 * width * patches ** 2  # bidirectional

    llm_layer, attn_width = _llm_layer_weights(config)
    llm_attention_fwd = t.num_hidden_layers * 2.0 * attn_width * counts.segment_sq_sum  # causal: half of 4*D*L^2

    und_hidden = (config.vision_config.depth - 1) * config.vision_config.projection_dim ** 2
    gen_hidden = (q.num_hidden_layers - 1) * q.projection_dim ** 2

    parts = {
        "und_encoder": _matmul(patch_weights, und_positions, siglip_trains, False)
        + _matmul(siglip_layers * siglip_layer, und_positions, siglip_trains, siglip_trains)
        + siglip_attention_fwd * (3 if siglip_trains else 1),
        "und_adaptor": _matmul(width * config.vision_config.projection_dim, und_positions, und_adaptor_trains,
                               siglip_trains)
        + _matmul(und_hidden, und_positions, und_adaptor_trains, siglip_trains or und_adaptor_trains),
        "gen_adaptor": _matmul(q.embed_dim * q.projection_dim, counts.gen_image_tokens, gen_adaptor_trains,
                               gen_embed_trains)
        + _matmul(gen_hidden, counts.gen_image_tokens, gen_adaptor_trains, gen_embed_trains or gen_adaptor_trains),
        "llm": _matmul(t.num_hidden_layers * llm_layer, counts.real_tokens, "llm" in tr, llm_grad),
        "llm_attention": llm_attention_fwd * (3 if llm_grad else 1),
        "lm_head": _matmul(D * t.vocab_size, counts.text_targets, "lm_head" in tr, llm_grad),
        "gen_head": _matmul(q.image_token_embed_dim * q.projection_dim, counts.image_targets, gen_head_trains, llm_grad)
        + _matmul(q.projection_dim * q.num_embeddings, counts.image_targets, gen_head_trains,
                  llm_grad or gen_head_trains),
    }
    # Recompute skips each layer's last matmul (early stop, see the docstring): down_proj (I x D), fc2 (mlp x w).
    recompute = {}
    if checkpointing and llm_grad:
        recomputed = llm_layer - t.intermediate_size * D
        recompute["llm"] = 2.0 * t.num_hidden_layers * recomputed * counts.real_tokens + llm_attention_fwd
    if checkpointing and siglip_trains:
        recomputed = siglip_layer - int(width * config.vision_config.mlp_ratio) * width
        recompute["und_encoder"] = 2.0 * siglip_layers * recomputed * und_positions + siglip_attention_fwd
    return Flops(parts=parts, recompute=recompute)


# Dense bf16 tensor-core peaks (no sparsity), per GPU, matched by substrings of
# torch.cuda.get_device_name(); the more specific names come first.
_PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),   # SXM
    ("H200", 989e12),   # same compute as H100 SXM, more memory
    ("H800", 989e12),
    ("A100", 312e12),
    ("A800", 312e12),
)


def peak_flops(device_name: str | None = None) -> float | None:
    """Peak bf16 FLOP/s of one GPU by name (default: the current CUDA device); None when unknown or CPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    return next((peak for key, peak in _PEAK_BF16 if key in device_name), None)


def mfu(flops: float, seconds: float, n_gpus: int, peak_flops: float | None) -> float | None:
    """Share of the GPUs' peak that `flops` done in `seconds` used; None without a known peak."""
    if peak_flops is None or seconds <= 0:
        return None
    return flops / (seconds * n_gpus * peak_flops)


def tokens_per_second(tokens: int, seconds: float) -> float:
    """Tokens per wall-clock second (pass real tokens: pads are not throughput)."""
    return tokens / seconds if seconds > 0 else 0.0


@dataclass(frozen=True)
class StepFigures:
    """One step's log line; `counts` summed over every micro-batch of every rank."""

    tokens_per_s: float          # real tokens, whole job
    tokens_per_s_per_gpu: float
    samples_per_s: float
    packing_efficiency: float
    model_tflops_per_gpu: float  # achieved model TFLOP/s per GPU
    mfu: float | None
    hfu: float | None

    def as_dict(self) -> dict[str, float | None]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def step_figures(counts: BatchCounts, seconds: float, n_gpus: int, config: JanusConfig,
                 trainable: tuple[str, ...] | list[str], checkpointing: bool = False,
                 peak: float | None = None) -> StepFigures:
    """Every throughput figure of one step, from its summed counts and its wall time."""
    flops = training_flops(counts, config, trainable, checkpointing)
    per_gpu_seconds = seconds * n_gpus
    return StepFigures(
        tokens_per_s=tokens_per_second(counts.real_tokens, seconds),
        tokens_per_s_per_gpu=tokens_per_second(counts.real_tokens, per_gpu_seconds),
        samples_per_s=tokens_per_second(counts.samples, seconds),
        packing_efficiency=counts.real_tokens / counts.row_tokens if counts.row_tokens else 0.0,
        model_tflops_per_gpu=flops.model / per_gpu_seconds / 1e12 if per_gpu_seconds > 0 else 0.0,
        mfu=mfu(flops.model, seconds, n_gpus, peak),
        hfu=mfu(flops.hardware, seconds, n_gpus, peak),
    )
