"""The memory model: bytes per GPU of one setting (sharding, rows per micro-batch, checkpointing, ZeRO sizes, frozen
weights, gradient dtype), without building the model. `estimate_memory` is the only place it is added up: the dry
run's memory table, the performance plan's rows and so the recommended template all read it.

Per GPU, in bytes (P = all parameters, P_t = trainable ones, W = the GPUs sharding them: the world, MiCS's node).
With LoRA (--lora-rank), P_t is the adapters' rank x (in + out) per adapted layer plus the parts still trained whole
(model/lora.py's rule): the LLM's and SigLIP's own weights count as frozen, so gradients and optimizer state shrink
to those, while the activations below gain the adapters' own:

    weights          2 * P / W           bf16, every parameter: ZeRO-3 partitions frozen ones too; hpZ adds a second
                                         copy over its group (2 * P / hpZ), ZeRO-2 keeps them whole (2 * P)
    gradients        2 * P_t / W         bf16, trainable only; 4 * P_t / W under ZeRO-3 with more than one
                                         micro-batch a step (pipeline/ds_config.py accumulates them in fp32)
    master weights   4 * P_t / W         fp32, trainable only
    Adam m and v     8 * P_t / W         fp32, trainable only
    gathered params  2 * the most elements the gather trace holds at once (gathers.py walks deepspeed's fetch,
                     prefetch and release over the module trace: the prefetch bucket, reuse distance and max live
                     parameters decide it); none under ZeRO-2
    frozen, whole    2 * frozen parameters the training forward uses, only with --frozen-weights persisted under
                     ZeRO-3: held whole on every rank (not the VQ, which runs in preprocessing, nor SigLIP's unused
                     attention-pool head: never gathered in training)
    activations      tokens = micro_batch_rows * seq_len (pads occupy memory too), per LLM layer:
                       no checkpointing: (26 * D + 8 * I) bytes/token (derived below)
                       checkpointing:    2 * D bytes/token (the bf16 layer input), plus one layer's
                                         full activations while it is recomputed
                       LoRA adds, per adapted layer, r bf16 values (lora_B's input) and, with --lora-dropout
                                         above 0, a bf16 copy of the layer's input and its 1-byte dropout mask
                                         (each adapter drops out its own copy): (3 * in + 2 * r) bytes/token
                     plus SigLIP's when it trains (Stage III): (18 * w + 4 * mlp) = 34 * w bytes per
                     patch and layer (Korthikanti et al. 2022's 34*h for a GPT layer without dropout
                     masks and attention scores, which is what SigLIP's layer is), 2 * w with checkpointing
    head logits      8 bytes per logit at target positions only: text targets x vocab + image targets
                     x 16,384 (fp32 logits and the fp32 log-softmax that cross-entropy saves are both
                     alive at the loss); targets per row from the stage's ratio (see `row_mix`); at most
                     LOGIT_PEAK: the loss runs a head on one chunk of targets at a time (model/head_loss.py)

Llama layer, bytes saved for backward per token (bf16 = 2 bytes; flash/SDPA attention keeps no L x L
scores): each RMSNorm keeps an fp32 copy of its input (transformers upcasts) and its bf16 normalised
input, 6D, twice = 12D; the q/k/v input 2D; q, k, v after RoPE and the attention output 6D + 2D; the
o_proj input 2D; the gate/up input 2D; gate output, SiLU output, up output and their product 8I.
Total 26D + 8I, i.e. 47.5 D for the 7B (I = 2.69 D), a little above Korthikanti's 34 D for a GPT layer
(its 4D GELU MLP keeps 2 tensors of 4D; SwiGLU keeps 4 of I). Measured on the tiny model within 5%.

    worst row's logits  a micro-batch of text rows: every position a target of the 102,400-wide LM head
                     (8 B x rows x seq_len x vocab, 3.1 GiB for one 4096-token row, at most LOGIT_PEAK); the total
                     takes the larger of this and the typical logits above, since any micro-batch may be all text
    head gradients   the full bf16 gradient of the embedding or LM head (V x D each), alive whole before
                     its reduce-scatter: the larger of the two trainable ones (one at each end of the backward)
    reduce buckets   2 * reduce_bucket_size in the gradients' communication dtype: the contiguous bucket being
                     filled and, under overlap_comm, the one still being reduced
    CUDA + NCCL      1 GiB CUDA context and workspaces, 0.5 GiB of NCCL buffers per communicator (hpZ and
                     MiCS add a second one)
    fragmentation    10% on top of everything

Not counted: the dummy SigLIP run of micro-batches without images, offloading (zero3_offload.json), parameters
below the persistence threshold held whole (norms: under 0.1% of the 7B). The launchers set
PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, which keeps fragmentation near the margin above.

DeepSpeed's own estimate (`estimate_zero3_model_states_mem_needs_all_cold`) assumes every parameter
trains: 18 bytes per parameter sharded, plus 4 bytes per parameter of the largest layer; it covers
model states only (no activations, no logits).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, replace

from transformers import JanusConfig

from model.config import model_config
from model.head_loss import LOGITS_CHUNK_BYTES
from model.lora import LoraSettings, adapted_inputs, adapter_parameter_count, fully_trained
from model.sample import TASKS
from model.stages import NEVER_TRAINED, PARTS, Stage, part_of
from model.summary import meta_model
from pipeline.ds_config import ZeroSizes

BF16, FP32 = 2, 4
GIB = 2 ** 30
LOGIT_BYTES = 8  # fp32 logits + fp32 log-softmax saved by cross-entropy
# The loss's peak, however many targets: one recomputed chunk's fp32 logits, their log-softmax and gradients and the
# head's bf16 output (3.4 chunks measured on the CPU with an fp32 head: bench/loss_memory.py).
LOGIT_PEAK = 4 * LOGITS_CHUNK_BYTES
CUDA_CONTEXT = 1.0 * GIB     # CUDA context, cuBLAS workspaces
NCCL_PER_GROUP = 0.5 * GIB   # NCCL buffers per communicator
FRAGMENTATION = 0.10         # allocator margin on top of everything else

# Parameters the training forward never uses: the VQ encodes images in preprocessing; NEVER_TRAINED (SigLIP's
# attention-pool head) has no use in Janus. Never gathered, never counted as frozen weights held whole.
NOT_IN_FORWARD = ("model.vqmodel.", *NEVER_TRAINED)

SHARDINGS = ("zero3", "zero3-hpz", "mics", "zero2")
SHARDING_NAMES = {"zero3": "ZeRO-3", "zero3-hpz": "ZeRO-3 hpZ", "mics": "MiCS", "zero2": "ZeRO-2"}
FROZEN_WEIGHTS = ("partitioned", "persisted")  # --frozen-weights, for the ZeRO-3 kinds


@dataclass(frozen=True)
class Setting:
    """One way to run a stage, as the dry run costs it: DeepSpeed's sharding and sizes, and the run's flags."""

    sharding: str               # one of SHARDINGS
    micro_batch_rows: int
    checkpointing: bool
    zero: ZeroSizes             # buckets, persistence threshold, max live parameters, reuse distance
    frozen_weights: str = "partitioned"  # --frozen-weights (ZeRO-3 kinds), or "whole" (ZeRO-2 keeps every weight)
    grad_bytes: int = BF16      # gradients reduced in bf16, or in fp32 (communication_data_type)
    hpz: int = 1                # zero_hpz_partition_size: GPUs sharing hpZ's secondary copy ("zero3-hpz")


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
    largest_module: int   # most parameters one module owns directly (DeepSpeed's estimate takes it)
    decoder_layer: int    # one LLM decoder layer
    frozen_used: int = 0  # frozen parameters the training forward uses (not NOT_IN_FORWARD)
    adapters: int = 0     # LoRA's, in `total` and `trainable` too


def param_counts(model: str | JanusConfig, trainable: tuple[str, ...] | list[str],
                 lora: LoraSettings | None = None) -> ParamCounts:
    """Parameter counts of a preset, checkpoint directory or config, counted on the meta device. With `lora`,
    `trainable` is the parts trained whole (`model.lora.fully_trained`) and the adapters are added."""
    meta = meta_model(model)
    adapters = adapter_parameter_count(meta, lora) if lora else 0
    total, trainable_count, frozen_used = adapters, adapters, 0
    for name, param in meta.named_parameters():
        total += param.numel()
        if part_of(name) in trainable and not name.startswith(NEVER_TRAINED):
            trainable_count += param.numel()
        elif not name.startswith(NOT_IN_FORWARD):
            frozen_used += param.numel()
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in meta.modules())
    layer = sum(p.numel() for p in meta.model.language_model.layers[0].parameters())
    return ParamCounts(total=total, trainable=trainable_count, largest_module=largest, decoder_layer=layer,
                       frozen_used=frozen_used, adapters=adapters)


# Compared by identity (eq=False): JanusConfig is unhashable, and gathers.py caches its module trace per workload.
@dataclass(frozen=True, eq=False)
class Workload:
    """A model and the stage it trains (its ratio, seq_len, trainable parts, rows per step): what is costed."""

    name: str             # the preset or checkpoint directory, as printed; "config" for a JanusConfig
    config: JanusConfig
    stage: Stage          # with LoRA: `trainable` holds the parts trained whole
    params: ParamCounts
    lora: LoraSettings | None = None


def workload(model: str | JanusConfig, stage: Stage, name: str | None = None,
             lora: LoraSettings | None = None) -> Workload:
    """A model (a preset, a checkpoint directory, or a config already read: then named `name`) and its stage,
    trained with LoRA adapters where `lora` is given."""
    config = model if isinstance(model, JanusConfig) else model_config(model)
    if lora is not None:  # the adapted parts no longer train whole: gradients, optimizer, SigLIP's activations
        stage = replace(stage, trainable=fully_trained(stage.trainable))
    return Workload(name=name or (model if isinstance(model, str) else "config"), config=config, stage=stage,
                    params=param_counts(config, stage.trainable, lora), lora=lora)


def llm_layer_activation_bytes(config: JanusConfig) -> int:
    """Bytes per token one Llama decoder layer keeps for backward without checkpointing: 26*D + 8*I."""
    t = config.text_config
    return 26 * t.hidden_size + 8 * t.intermediate_size


def siglip_layer_activation_bytes(config: JanusConfig) -> int:
    """Bytes per patch one SigLIP layer keeps for backward: 18*w + 4*mlp (= 34*w at mlp = 4w)."""
    v = config.vision_config
    return 18 * v.hidden_size + 4 * int(v.hidden_size * v.mlp_ratio)


def lora_layer_activation_bytes(config: JanusConfig, lora: LoraSettings | None) -> int:
    """Bytes per token the LoRA adapters of one LLM decoder layer keep for backward: (3 * in + 2 * r) per adapted
    layer with dropout (lora_A's dropped-out bf16 input and its bool mask; lora_B's r-wide bf16 input), 2 * r
    without (lora_A then reads the layer's own input, kept anyway)."""
    if lora is None:
        return 0
    dropped = BF16 + 1 if lora.dropout > 0 else 0
    inputs = adapted_inputs(meta_model(config), lora, PARTS["llm"] + "layers.0.")
    return sum(dropped * width + BF16 * lora.rank for width in inputs)


def activation_bytes(config: JanusConfig, tokens: int, und_images: float, siglip_trains: bool,
                     checkpointing: bool, lora_bytes: int = 0) -> float:
    """Activations of one micro-batch of `tokens` row positions (and its understanding images); `lora_bytes`: the
    adapters' per token and LLM layer (`lora_layer_activation_bytes`)."""
    t, v = config.text_config, config.vision_config
    full = llm_layer_activation_bytes(config) + lora_bytes
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
    return min(LOGIT_BYTES * (text_targets * vocab + image_targets * codebook), LOGIT_PEAK)


def worst_row_logit_bytes(config: JanusConfig, rows: int, seq_len: int) -> float:
    """Logits of a micro-batch whose rows are all text: every position a target of the LM head."""
    return min(LOGIT_BYTES * rows * seq_len * config.text_config.vocab_size, LOGIT_PEAK)


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
    """Bytes per GPU of one setting, line by line. `activations` is the setting's; both variants are kept for the
    table."""

    model: str
    world_size: int
    seq_len: int
    setting: Setting
    params: ParamCounts
    mix: RowMix
    weights: float
    gradient_element: int       # bytes a gradient element is kept in (fp32 when ZeRO-3 accumulates micro-batches)
    gradients: float
    master_weights: float
    adam_states: float
    gathered_params: float
    persisted_frozen: float     # the forward's frozen parameters whole in bf16, when persisted
    activations_checkpointed: float
    activations_full: float
    logits: float
    worst_logits: float
    head_gradients: float
    reduce_buckets: float
    communicators: int          # NCCL communicators: hpZ and MiCS keep a second one

    @property
    def activations(self) -> float:
        return self.activations_checkpointed if self.setting.checkpointing else self.activations_full

    @property
    def optimizer(self) -> float:
        """Everything the optimizer needs per GPU: gradients, fp32 master weights, Adam m and v."""
        return self.gradients + self.master_weights + self.adam_states

    @property
    def model_states(self) -> float:
        return self.weights + self.optimizer

    @property
    def overhead(self) -> float:
        """CUDA context and the NCCL communicators."""
        return CUDA_CONTEXT + self.communicators * NCCL_PER_GROUP

    @property
    def total(self) -> float:
        used = (self.model_states + self.gathered_params + self.persisted_frozen + self.activations
                + max(self.logits, self.worst_logits) + self.head_gradients + self.reduce_buckets + self.overhead)
        return used * (1 + FRAGMENTATION)


def gradient_bytes(setting: Setting, rows_per_rank: int) -> int:
    """Bytes a gradient element is kept in: fp32 where ZeRO-3 accumulates several micro-batches (the filled
    `data_types.grad_accum_dtype`), else bf16."""
    accumulating = rows_per_rank // setting.micro_batch_rows > 1
    return FP32 if accumulating and setting.sharding != "zero2" else BF16


def estimate_memory(work: Workload, setting: Setting, world_size: int, gpus_per_node: int,
                    gathered_peak: int) -> MemoryEstimate:
    """Bytes per GPU of `setting` (see the module docstring); `gathered_peak`: the most elements its gather trace
    holds at once (gathers.py's `Gathers.peak_held`)."""
    config, stage, p = work.config, work.stage, work.params
    sharding, rows = setting.sharding, setting.micro_batch_rows
    shards = min(gpus_per_node, world_size) if sharding == "mics" else world_size
    weights = {"zero3": BF16 * p.total / shards, "zero3-hpz": BF16 * p.total * (1 / shards + 1 / setting.hpz),
               "mics": BF16 * p.total / shards, "zero2": BF16 * p.total}[sharding]
    zero3 = sharding != "zero2"  # ZeRO-2 gathers nothing and persists nothing: every weight is whole
    mix = row_mix(stage.ratio, stage.seq_len)
    tokens = rows * stage.seq_len
    und_images = rows * mix.und_images
    siglip_trains = "und_encoder" in stage.trainable
    lora_bytes = lora_layer_activation_bytes(config, work.lora)
    return MemoryEstimate(
        model=work.name, world_size=world_size, seq_len=stage.seq_len, setting=setting, params=p, mix=mix,
        weights=weights,
        gradient_element=(grad := gradient_bytes(setting, stage.rows_per_step // world_size)),
        gradients=grad * p.trainable / shards,
        master_weights=FP32 * p.trainable / shards,
        adam_states=2 * FP32 * p.trainable / shards,
        gathered_params=BF16 * gathered_peak if zero3 else 0.0,
        persisted_frozen=BF16 * p.frozen_used if zero3 and setting.frozen_weights == "persisted" else 0.0,
        activations_checkpointed=activation_bytes(config, tokens, und_images, siglip_trains, True, lora_bytes),
        activations_full=activation_bytes(config, tokens, und_images, siglip_trains, False, lora_bytes),
        logits=rows * logit_bytes(config, mix.text_targets, mix.image_targets),
        worst_logits=worst_row_logit_bytes(config, rows, stage.seq_len),
        head_gradients=head_gradient_bytes(config, stage.trainable),
        reduce_buckets=2 * setting.grad_bytes * setting.zero.reduce_bucket,
        communicators=2 if sharding in ("zero3-hpz", "mics") else 1,
    )


def format_memory(est: MemoryEstimate, deepspeed_gpu: int, deepspeed_table: str) -> str:
    """The dry run's memory table: our estimate line by line, then DeepSpeed's all-trainable model-state estimate."""
    p, m, s = est.params, est.mix, est.setting

    def line(label: str, value: float, note: str = "") -> str:
        return f"  {label:<26} {value / GIB:>9.2f} GiB  {note}"

    ckpt = "on" if s.checkpointing else "off"
    over = "node" if s.sharding == "mics" else "world"
    weights = {"zero3": "2 B x all params / world", "mics": "2 B x all params / node",
               "zero3-hpz": f"2 B x all params / world + 2 B x all / {s.hpz} (hpZ copy)",
               "zero2": "2 B x all params, whole"}[s.sharding]
    grads = "fp32" if s.grad_bytes == FP32 else "bf16"
    cap = f"{LOGIT_PEAK / GIB:g} GiB (chunked)"
    out = [
        f"{SHARDING_NAMES[s.sharding]} memory per GPU: model {est.model}, world {est.world_size}, micro-batch "
        f"{s.micro_batch_rows} row(s) x {est.seq_len} tokens, checkpointing {ckpt}",
        f"  parameters {p.total / 1e9:.3f} B, trainable {p.trainable / 1e9:.3f} B"
        + (f" (LoRA adapters {p.adapters / 1e6:.1f} M)" if p.adapters else "") + ", "
        f"largest module {p.largest_module / 1e6:.0f} M, decoder layer {p.decoder_layer / 1e6:.0f} M",
        f"  per row (assumed from the ratio): {m.text_targets:.0f} text targets, {m.image_targets:.0f} image "
        f"targets, {m.und_images:.1f} und. images",
        line("weights (bf16, all)", est.weights, weights),
        line(f"gradients ({'fp32' if est.gradient_element == FP32 else 'bf16'})", est.gradients,
             f"{est.gradient_element} B x trainable / {over}"),
        line("master weights (fp32)", est.master_weights, f"4 B x trainable / {over}"),
        line("Adam m, v (fp32)", est.adam_states, f"8 B x trainable / {over}"),
        line("gathered params (bf16)", est.gathered_params,
             f"peak of the gather trace (prefetch bucket {s.zero.prefetch_bucket / 1e6:.1f} M)"
             if s.sharding != "zero2" else "none: ZeRO-2 keeps every weight whole"),
        line("frozen weights, whole", est.persisted_frozen,
             f"2 B x frozen params the forward uses ({s.frozen_weights})"),
        line("activations, ckpt on", est.activations_checkpointed, "2*D B/token/layer + one layer recomputed"),
        line("activations, ckpt off", est.activations_full,
             "(26*D + 8*I) B/token/layer" + (" + LoRA's (3*in + 2*r) per adapter" if p.adapters else "")),
        line("head logits, typical", est.logits, f"{LOGIT_BYTES} B x targets x head width, at most {cap}"),
        line("head logits, worst row", est.worst_logits,
             f"{LOGIT_BYTES} B x seq_len x vocab per text row, at most {cap}"),
        line("head gradients (bf16)", est.head_gradients, "full V x D gradient before its reduce-scatter"),
        line(f"reduce buckets ({grads})", est.reduce_buckets,
             f"2 x reduce bucket of {s.zero.reduce_bucket / 1e6:.1f} M elements"),
        line("CUDA context + NCCL", est.overhead, "1 GiB + 0.5 GiB per communicator"),
        line("total (ours)", est.total, f"checkpointing {ckpt}; + {FRAGMENTATION:.0%} fragmentation margin"),
        line("DeepSpeed all-trainable", deepspeed_gpu, "model states only: 18 B x all / world + 4 B x largest"),
        line("ours, same scope", est.model_states + BF16 * 2 * p.largest_module, "model states + 4 B x largest"),
        "DeepSpeed's own table:",
        deepspeed_table.rstrip(),
    ]
    return "\n".join(out)
