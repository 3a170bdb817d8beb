"""`--dry-run`: memory per GPU under ZeRO-3 for a model, a stage and a world size, without building the model.

Our estimate, per GPU, in bytes (P = all parameters, P_t = trainable ones, W = world size):

    weights          2 * P / W           bf16, every parameter: ZeRO-3 partitions frozen ones too
    gradients        2 * P_t / W         bf16, trainable only
    master weights   4 * P_t / W         fp32, trainable only
    Adam m and v     8 * P_t / W         fp32, trainable only
    gathered params  2 * (largest module + prefetch_layers * decoder layer)
                     ZeRO-3 gathers one module's full bf16 parameters at a time (the largest is the
                     102,400 x D embedding or LM head), and prefetches the next few decoder layers
    frozen, whole    2 * frozen parameters the training forward uses, only with --frozen-weights
                     persisted: held whole on every rank (not the VQ, which runs in preprocessing, nor
                     SigLIP's unused attention-pool head: never gathered in training)
    activations      tokens = micro_batch_rows * seq_len (pads occupy memory too), per LLM layer:
                       no checkpointing: (26 * D + 8 * I) bytes/token (derived below)
                       checkpointing:    2 * D bytes/token (the bf16 layer input), plus one layer's
                                         full activations while it is recomputed
                     plus SigLIP's when it trains (Stage III): (18 * w + 4 * mlp) = 34 * w bytes per
                     patch and layer (Korthikanti et al. 2022's 34*h for a GPT layer without dropout
                     masks and attention scores, which is what SigLIP's layer is), 2 * w with checkpointing
    head logits      8 bytes per logit at target positions only: text targets x vocab + image targets
                     x 16,384 (fp32 logits and the fp32 log-softmax that cross-entropy saves are both
                     alive at the loss); targets per row from the stage's ratio (see `row_mix`)

Llama layer, bytes saved for backward per token (bf16 = 2 bytes; flash/SDPA attention keeps no L x L
scores): each RMSNorm keeps an fp32 copy of its input (transformers upcasts) and its bf16 normalised
input, 6D, twice = 12D; the q/k/v input 2D; q, k, v after RoPE and the attention output 6D + 2D; the
o_proj input 2D; the gate/up input 2D; gate output, SiLU output, up output and their product 8I.
Total 26D + 8I, i.e. 47.5 D for the 7B (I = 2.69 D), a little above Korthikanti's 34 D for a GPT layer
(its 4D GELU MLP keeps 2 tensors of 4D; SwiGLU keeps 4 of I). Measured on the tiny model within 5%.

    worst row's logits  a micro-batch of text rows: every position a target of the 102,400-wide LM head
                     (8 B x rows x seq_len x vocab: 3.1 GiB for one 4096-token row); the total takes the larger
                     of this and the typical logits above, since any micro-batch may be all text
    head gradients   the full bf16 gradient of the embedding or LM head (V x D each), alive whole before
                     its reduce-scatter: the larger of the two trainable ones (one at each end of the backward)
    CUDA + NCCL      1 GiB CUDA context and workspaces, 0.5 GiB of NCCL buffers per communicator
    fragmentation    10% on top of everything

Not counted: ZeRO's reduce buckets (pipeline/plan.py adds them per sharding choice) and the dummy SigLIP run of
micro-batches without images. The launchers set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, which keeps
fragmentation near the margin above.

DeepSpeed's own estimate (`estimate_zero3_model_states_mem_needs_all_cold`) assumes every parameter
trains: 18 bytes per parameter sharded, plus 4 bytes per parameter of the largest layer; it covers
model states only (no activations, no logits).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace

from transformers import JanusConfig

from model.config import model_config, model_size
from model.sample import TASKS
from model.stages import NEVER_TRAINED, Stage, part_of, stage_for
from model.summary import meta_model
from pipeline.config import ConfigError, TrainConfig
from pipeline.preflight import checked_plan

BF16, FP32 = 2, 4
GIB = 2 ** 30
LOGIT_BYTES = 8  # fp32 logits + fp32 log-softmax saved by cross-entropy
CUDA_CONTEXT = 1.0 * GIB     # CUDA context, cuBLAS workspaces
NCCL_PER_GROUP = 0.5 * GIB   # NCCL buffers per communicator
FRAGMENTATION = 0.10         # allocator margin on top of everything else


@dataclass(frozen=True)
class TypicalSample:
    """An average sample of a task, for filling a row by the stage's ratio (counted in samples, the mixer's default)."""

    tokens: int
    text_targets: int
    image_targets: int
    und_images: int


# Assumed shapes, not measured on the real corpus: an understanding sample is 576 image positions + ~74 text
# tokens of which ~40 answer tokens are targets; a generation sample is a ~14-token prompt + 576 image
# targets; a text sample ~800 tokens, all targets (pieces of longer documents).
TYPICAL_SAMPLES = {
    "understanding": TypicalSample(tokens=650, text_targets=40, image_targets=0, und_images=1),
    "text": TypicalSample(tokens=800, text_targets=799, image_targets=0, und_images=0),
    "generation": TypicalSample(tokens=590, text_targets=0, image_targets=576, und_images=0),
}


@dataclass(frozen=True)
class RowMix:
    """Expected text targets, image targets and understanding images in one row of seq_len tokens."""

    text_targets: float
    image_targets: float
    und_images: float


def row_mix(ratio: tuple[int, ...], seq_len: int) -> RowMix:
    """A row filled with typical samples in the ratio und : text : gen (by samples)."""
    shapes = [TYPICAL_SAMPLES[task] for task in TASKS]
    rows_per_token = 1.0 / sum(r * s.tokens for r, s in zip(ratio, shapes, strict=True))
    scale = seq_len * rows_per_token
    return RowMix(
        text_targets=scale * sum(r * s.text_targets for r, s in zip(ratio, shapes, strict=True)),
        image_targets=scale * sum(r * s.image_targets for r, s in zip(ratio, shapes, strict=True)),
        und_images=scale * sum(r * s.und_images for r, s in zip(ratio, shapes, strict=True)),
    )


@dataclass(frozen=True)
class ParamCounts:
    total: int
    trainable: int
    largest_module: int   # most parameters one module owns directly: what ZeRO-3 gathers at once
    decoder_layer: int    # one LLM decoder layer
    frozen_used: int = 0  # frozen parameters the training forward uses (not the VQ, not NEVER_TRAINED)


def param_counts(model: str | JanusConfig, trainable: tuple[str, ...] | list[str]) -> ParamCounts:
    """Parameter counts of a preset, checkpoint directory or config, counted on the meta device."""
    meta = meta_model(model)
    total = trainable_count = frozen_used = 0
    for name, param in meta.named_parameters():
        total += param.numel()
        if part_of(name) in trainable and not name.startswith(NEVER_TRAINED):
            trainable_count += param.numel()
        elif not name.startswith(("model.vqmodel.", *NEVER_TRAINED)):
            frozen_used += param.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in meta.modules())
    layer = sum(p.numel() for p in meta.model.language_model.layers[0].parameters())
    return ParamCounts(total=total, trainable=trainable_count, largest_module=largest, decoder_layer=layer,
                       frozen_used=frozen_used)


def llm_layer_activation_bytes(config: JanusConfig) -> int:
    """Bytes per token one Llama decoder layer keeps for backward without checkpointing: 26*D + 8*I."""
    t = config.text_config
    return 26 * t.hidden_size + 8 * t.intermediate_size


def siglip_layer_activation_bytes(config: JanusConfig) -> int:
    """Bytes per patch one SigLIP layer keeps for backward: 18*w + 4*mlp (= 34*w at mlp = 4w)."""
    v = config.vision_config
    return 18 * v.hidden_size + 4 * int(v.hidden_size * v.mlp_ratio)


def activation_bytes(config: JanusConfig, tokens: int, und_images: float, siglip_trains: bool,
                     checkpointing: bool) -> float:
    """Activations of one micro-batch of `tokens` row positions (and its understanding images)."""
    t, v = config.text_config, config.vision_config
    full = llm_layer_activation_bytes(config)
    if checkpointing:  # layer inputs kept, plus one layer's activations while it is recomputed
        llm = t.num_hidden_layers * BF16 * t.hidden_size * tokens + full * tokens
    else:
        llm = t.num_hidden_layers * full * tokens
    if not siglip_trains:
        return float(llm)  # a frozen SigLIP on pixels that need no gradient keeps nothing for backward
    patches = und_images * (v.image_size // v.patch_size) ** 2
    siglip_full = siglip_layer_activation_bytes(config)
    if checkpointing:
        siglip = v.num_hidden_layers * BF16 * v.hidden_size * patches + siglip_full * patches
    else:
        siglip = v.num_hidden_layers * siglip_full * patches
    return float(llm + siglip)


def logit_bytes(config: JanusConfig, text_targets: float, image_targets: float) -> float:
    """Head logits at target positions only (the heads never run on the whole row)."""
    vocab, codebook = config.text_config.vocab_size, config.vq_config.num_embeddings
    return LOGIT_BYTES * (text_targets * vocab + image_targets * codebook)


def worst_row_logit_bytes(config: JanusConfig, rows: int, seq_len: int) -> float:
    """Logits of a micro-batch whose rows are all text: every position a target of the LM head."""
    return LOGIT_BYTES * rows * seq_len * config.text_config.vocab_size


def head_gradient_bytes(config: JanusConfig, trainable: tuple[str, ...] | list[str]) -> float:
    """The full bf16 gradient of the larger trainable vocabulary matrix (token embedding in the LLM, or LM head)."""
    t = config.text_config
    return BF16 * t.vocab_size * t.hidden_size if {"llm", "lm_head"} & set(trainable) else 0.0


def nodes_and_gpus(world_size: int, gpus_per_node: int = 8) -> tuple[int, int]:
    """(nodes, GPUs per node) for a world size: one partial node below gpus_per_node."""
    if world_size <= gpus_per_node:
        return 1, world_size
    if world_size % gpus_per_node:
        raise ValueError(f"world size {world_size} is not a whole number of {gpus_per_node}-GPU nodes")
    return world_size // gpus_per_node, gpus_per_node


def deepspeed_estimate(total_params: int, largest_layer_params: int, world_size: int,
                       gpus_per_node: int = 8) -> tuple[int, str]:
    """DeepSpeed's all-trainable ZeRO-3 estimate: (GPU bytes without offload, with zero.Init; its printed table).

    `estimate_zero3_model_states_mem_needs_all_cold` prints and returns None (deepspeed 0.19.8), so the table is
    captured and the number read from `estimate_zero3_model_states_mem_needs`, which it calls for each row.
    """
    from deepspeed.runtime.zero.stage3 import (  # deepspeed is slow to import: only on a dry run
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )

    nodes, per_node = nodes_and_gpus(world_size, gpus_per_node)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        estimate_zero3_model_states_mem_needs_all_cold(total_params, largest_layer_params, per_node, nodes)
    _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(
        total_params, largest_layer_params, per_node, nodes, cpu_offload=False, cpu_offload_params=False,
        zero_init=True)
    return int(gpu_bytes), printed.getvalue()


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU. `activations` is the one for `checkpointing`; both variants are kept for the table."""

    model: str
    world_size: int
    micro_batch_rows: int
    seq_len: int
    checkpointing: bool
    params: ParamCounts
    mix: RowMix
    weights: float
    gradients: float
    master_weights: float
    adam_states: float
    gathered_params: float
    activations_checkpointed: float
    activations_full: float
    logits: float
    worst_logits: float
    head_gradients: float
    deepspeed_gpu: int
    deepspeed_table: str
    frozen_whole: float                 # the forward's frozen parameters in bf16: what persisted holds
    frozen_weights: str = "partitioned"

    @property
    def persisted_frozen(self) -> float:
        return self.frozen_whole if self.frozen_weights == "persisted" else 0.0

    @property
    def activations(self) -> float:
        return self.activations_checkpointed if self.checkpointing else self.activations_full

    @property
    def optimizer(self) -> float:
        """Everything the optimizer needs per GPU: gradients, fp32 master weights, Adam m and v."""
        return self.gradients + self.master_weights + self.adam_states

    @property
    def model_states(self) -> float:
        return self.weights + self.optimizer

    @property
    def overhead(self) -> float:
        """CUDA context and one NCCL communicator."""
        return CUDA_CONTEXT + NCCL_PER_GROUP

    @property
    def total(self) -> float:
        used = (self.model_states + self.gathered_params + self.persisted_frozen + self.activations
                + max(self.logits, self.worst_logits) + self.head_gradients + self.overhead)
        return used * (1 + FRAGMENTATION)


def estimate_memory(model: str | JanusConfig, stage: Stage, world_size: int, micro_batch_rows: int = 1,
                    seq_len: int | None = None, checkpointing: bool = True, gpus_per_node: int = 8,
                    prefetch_layers: int = 2, frozen_weights: str = "partitioned") -> MemoryEstimate:
    """Our ZeRO-3 per-GPU estimate (see the module docstring) next to DeepSpeed's all-trainable one."""
    config = model if isinstance(model, JanusConfig) else model_config(model)
    seq_len = seq_len or stage.seq_len
    params = param_counts(config, stage.trainable)
    mix = row_mix(stage.ratio, seq_len)
    tokens = micro_batch_rows * seq_len
    und_images = micro_batch_rows * mix.und_images
    siglip_trains = "und_encoder" in stage.trainable
    ds_gpu, ds_table = deepspeed_estimate(params.total, params.largest_module, world_size, gpus_per_node)
    return MemoryEstimate(
        model=model if isinstance(model, str) else "config",
        world_size=world_size, micro_batch_rows=micro_batch_rows, seq_len=seq_len, checkpointing=checkpointing,
        params=params, mix=mix,
        weights=BF16 * params.total / world_size,
        gradients=BF16 * params.trainable / world_size,
        master_weights=FP32 * params.trainable / world_size,
        adam_states=2 * FP32 * params.trainable / world_size,
        gathered_params=BF16 * (params.largest_module + prefetch_layers * params.decoder_layer),
        activations_checkpointed=activation_bytes(config, tokens, und_images, siglip_trains, True),
        activations_full=activation_bytes(config, tokens, und_images, siglip_trains, False),
        logits=micro_batch_rows * logit_bytes(config, mix.text_targets, mix.image_targets),
        worst_logits=worst_row_logit_bytes(config, micro_batch_rows, seq_len),
        head_gradients=head_gradient_bytes(config, stage.trainable),
        deepspeed_gpu=ds_gpu, deepspeed_table=ds_table,
        frozen_whole=BF16 * params.frozen_used, frozen_weights=frozen_weights,
    )


def format_dry_run(est: MemoryEstimate) -> str:
    """The dry-run table: our estimate line by line, then DeepSpeed's all-trainable model-state estimate."""
    p, m = est.params, est.mix

    def line(label: str, value: float, note: str = "") -> str:
        return f"  {label:<26} {value / GIB:>9.2f} GiB  {note}"

    ckpt = "on" if est.checkpointing else "off"
    out = [
        f"ZeRO-3 memory per GPU: model {est.model}, world {est.world_size}, micro-batch {est.micro_batch_rows} "
        f"row(s) x {est.seq_len} tokens, checkpointing {ckpt}",
        f"  parameters {p.total / 1e9:.3f} B, trainable {p.trainable / 1e9:.3f} B, "
        f"largest module {p.largest_module / 1e6:.0f} M, decoder layer {p.decoder_layer / 1e6:.0f} M",
        f"  per row (assumed from the ratio): {m.text_targets:.0f} text targets, {m.image_targets:.0f} image "
        f"targets, {m.und_images:.1f} und. images",
        line("weights (bf16, all)", est.weights, "2 B x all params / world"),
        line("gradients (bf16)", est.gradients, "2 B x trainable / world"),
        line("master weights (fp32)", est.master_weights, "4 B x trainable / world"),
        line("Adam m, v (fp32)", est.adam_states, "8 B x trainable / world"),
        line("gathered params (bf16)", est.gathered_params, "largest module + prefetched layers"),
        line("frozen weights, whole", est.persisted_frozen,
             f"2 B x frozen params the forward uses ({est.frozen_weights})"),
        line("activations, ckpt on", est.activations_checkpointed, "2*D B/token/layer + one layer recomputed"),
        line("activations, ckpt off", est.activations_full, "(26*D + 8*I) B/token/layer"),
        line("head logits, typical", est.logits, f"{LOGIT_BYTES} B x targets x head width"),
        line("head logits, worst row", est.worst_logits, f"{LOGIT_BYTES} B x seq_len x vocab per text row"),
        line("head gradients (bf16)", est.head_gradients, "full V x D gradient before its reduce-scatter"),
        line("CUDA context + NCCL", est.overhead, "1 GiB + 0.5 GiB per communicator"),
        line("total (ours)", est.total, f"checkpointing {ckpt}; + {FRAGMENTATION:.0%} fragmentation margin"),
        line("DeepSpeed all-trainable", est.deepspeed_gpu, "model states only: 18 B x all / world + 4 B x largest"),
        line("ours, same scope", est.model_states + BF16 * 2 * p.largest_module, "model states + 4 B x largest"),
        "DeepSpeed's own table:",
        est.deepspeed_table.rstrip(),
    ]
    return "\n".join(out)


def planned_world_size(config: TrainConfig, world_size: int | None) -> int:
    """--world-size, or --nodes x --gpus-per-node; both must agree when both are given."""
    nodes, per_node = config.system.nodes, config.system.gpus_per_node
    if world_size and nodes and world_size != nodes * per_node:
        raise ConfigError(f"--world-size {world_size} is not --nodes {nodes} x --gpus-per-node {per_node}")
    if not (world_size or nodes):
        raise ConfigError("--dry-run needs --world-size or --nodes (the cluster to plan for)")
    return world_size or nodes * per_node


def dry_run(config: TrainConfig, world_size: int | None) -> str:
    """`--dry-run`: the batch plan (refused if impossible), the per-GPU memory estimate and the performance plan for
    every sharding choice, building nothing."""
    from pipeline.planning.report import cluster_for, stage_plan  # the plan builds on this module

    world_size = planned_world_size(config, world_size)
    plan = checked_plan(config, world_size)
    stage = replace(stage_for(config.stage, model_size(model_config(config.model.model))),
                    ratio=tuple(config.data.ratio), trainable=tuple(config.optim.trainable),
                    seq_len=config.data.seq_len, rows_per_step=config.optim.rows_per_step,
                    train_steps=config.optim.train_steps)
    system = config.system
    estimate = estimate_memory(config.model.model, stage, world_size, config.data.rows_per_micro_batch,
                               config.data.seq_len, config.model.gradient_checkpointing, system.gpus_per_node,
                               frozen_weights=system.frozen_weights)
    nodes, per_node = nodes_and_gpus(world_size, system.gpus_per_node)
    cluster = cluster_for(system.gpu, nodes, per_node, system.intra_node_gbps, system.inter_node_gbps)
    return (f"Stage {config.stage}, model {config.model.model}: {plan.rows_per_step} rows/step over {world_size} "
            f"ranks = {plan.accumulation_steps} micro-batch(es) of {plan.rows_per_micro_batch} row(s) x "
            f"{config.data.seq_len} tokens per rank\n" + format_dry_run(estimate) + "\n\n"
            + stage_plan(config.model.model, stage, cluster, f"Stage {config.stage} {config.model.model}"))
