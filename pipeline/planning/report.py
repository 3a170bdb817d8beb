"""The performance plan: per step FLOPs, bytes per collective, step time, MFU, days and memory per GPU, for every
sharding choice, and the one to run with the DeepSpeed template that runs it.

Cost model (printed with the table; docs/performance-plan.md holds its calibration):
- step time as step_time.py costs it (the generic decoder model, calibrated against published runs), applied to
  Janus's parts: the FLOPs of pipeline/metrics.py (with checkpointing's recompute) by matmul width, attention, the
  memory-bound traffic of the LLM's layers, SigLIP's and the heads' cross-entropy, the collectives of collectives.py
  on the gathers gathers.py traces, exposed communication at the step's edges, the optimizer, amortised saves and the
  data loader; each figure a central value and a range;
- memory per GPU is memory.py's `estimate_memory` of the row's setting;
- rows are packed full with typical samples of the stage's ratio (memory.py's TYPICAL_SAMPLES).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from itertools import product

from model.sample import TASKS
from model.stages import Stage
from pipeline.ds_config import MIN_BUCKET, ZeroSizes, template_path, zero_defaults
from pipeline.metrics import BatchCounts, llm_gets_gradient, training_flops
from pipeline.planning.collectives import (
    NETWORK_STEP_LATENCY,
    RING_BASE_LATENCY,
    Cluster,
    Collective,
    micro_batch_collectives,
    step_boundary_collectives,
)
from pipeline.planning.gathers import setting_gathers, workload_units
from pipeline.planning.memory import (
    BF16,
    CUDA_CONTEXT,
    FP32,
    FRAGMENTATION,
    FROZEN_WEIGHTS,
    GIB,
    NCCL_PER_GROUP,
    SHARDINGS,
    TYPICAL_SAMPLES,
    MemoryEstimate,
    Setting,
    Workload,
    estimate_memory,
)
from pipeline.planning.step_time import (
    LOGIT_TRAFFIC_BYTES,
    MATMUL_IN_MODEL,
    NCCL_CONTENTION,
    SAVED_BYTES_ALL,
    SAVED_BYTES_TRAINABLE,
    SPREAD,
    TRAINING_RUN,
    Matmuls,
    Measured,
    MicroBatchWork,
    Operations,
    Prediction,
    StepWork,
    layer_traffic,
    predict,
)

# fp32 gradient reduction is chosen where it costs at most this share of step time (NCCL's contention makes every
# extra byte cost a little, below what the model resolves).
FP32_FREE = 0.001
UNAVAILABLE = {"mics": "removed in deepspeed 0.19.8"}


def expected_counts(stage: Stage, rows: int) -> BatchCounts:
    """A micro-batch of `rows` rows packed full with typical samples in the stage's ratio (by samples)."""
    shapes = [TYPICAL_SAMPLES[task] for task in TASKS]
    per_cycle = sum(r * s.tokens for r, s in zip(stage.ratio, shapes, strict=True))
    cycles = rows * stage.seq_len / per_cycle

    def total(value) -> int:
        return round(cycles * sum(r * value(s) for r, s in zip(stage.ratio, shapes, strict=True)))

    image_targets = total(lambda s: s.image_targets)
    return BatchCounts(rows=rows, row_tokens=rows * stage.seq_len, real_tokens=rows * stage.seq_len,
                       samples=total(lambda s: 1), segment_sq_sum=total(lambda s: s.tokens ** 2),
                       text_targets=total(lambda s: s.text_targets), image_targets=image_targets,
                       und_images=total(lambda s: s.und_images), gen_image_tokens=image_targets)


@dataclass(frozen=True)
class PerformanceRow:
    """One setting costed for one optimizer step on a cluster; the time figures are the prediction's central values."""

    setting: Setting
    accumulation: int
    model_flops: float          # one step, whole job
    hardware_flops: float
    flops_by_part: dict
    collectives: list           # one step, per GPU: (Collective, times per step)
    compute_s: float
    comm_s: float
    boundary_s: float           # communication nothing hides: step edges, boundary collectives, overflow
    step_s: float
    mfu: float
    tokens_per_s: float
    days: float
    memory: MemoryEstimate      # per GPU; `.total` is what the plan prints
    fits: bool
    available: bool
    prediction: Prediction | None = None
    train_steps: int = 0

    @property
    def bytes_by_kind(self) -> dict[str, float]:
        """Wire bytes per GPU per step, by collective and whether it crosses nodes."""
        out: dict[str, float] = {}
        for c, times in self.collectives:
            key = f"{c.kind} {c.what} ({'across nodes' if c.across_nodes else 'in node'})"
            out[key] = out.get(key, 0.0) + c.wire_bytes * times
        return out

    @property
    def mfu_range(self) -> tuple[float, float]:
        return (self.prediction.low.mfu, self.prediction.high.mfu) if self.prediction else (self.mfu, self.mfu)

    @property
    def days_range(self) -> tuple[float, float]:
        """(fastest, slowest) days for the stage's steps."""
        if self.prediction is None:
            return self.days, self.days
        return tuple(self.train_steps * t.step_s / 86400 for t in (self.prediction.high, self.prediction.low))


# The widths (smallest weight dimension) of Janus's matmuls by part, for their shape efficiency.
def part_widths(work: Workload) -> dict[str, int]:
    text, vision = work.config.text_config, work.config.vision_config
    return {"llm": text.hidden_size, "lm_head": text.hidden_size, "gen_head": text.hidden_size,
            "gen_adaptor": text.hidden_size, "und_encoder": vision.hidden_size, "und_adaptor": vision.hidden_size}


def janus_micro_batch(work: Workload, counts: BatchCounts, checkpointing: bool) -> MicroBatchWork:
    """One micro-batch of Janus as the step-time model sees it: metrics.py's FLOPs by matmul width and attention, and
    the memory-bound traffic of the LLM's and SigLIP's layers and of the heads' cross-entropy."""
    config, trainable = work.config, work.stage.trainable
    text, vision = config.text_config, config.vision_config
    flops = training_flops(counts, config, trainable, checkpointing)
    llm_grad = llm_gets_gradient(counts, trainable)
    attention_fwd = flops.parts["llm_attention"] / (3 if llm_grad else 1)
    recomputed_attention = attention_fwd if "llm" in flops.recompute else 0.0
    matmuls = tuple(Matmuls(flops.parts[k] + flops.recompute.get(k, 0.0) - (recomputed_attention if k == "llm" else 0),
                            width) for k, width in part_widths(work).items())
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    llm = layer_traffic(text.hidden_size, text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim,
                        text.intermediate_size, "swiglu")
    llm_bytes = text.num_hidden_layers * counts.real_tokens * (
        llm.forward * (2 if "llm" in flops.recompute else 1) + (llm.backward if llm_grad else 0.0))
    siglip_trains = "und_encoder" in trainable
    width = vision.hidden_size
    siglip = layer_traffic(width, width, 0, int(width * vision.mlp_ratio), "gelu")
    patches = (vision.image_size // vision.patch_size) ** 2
    siglip_bytes = vision.num_hidden_layers * counts.und_images * patches * (
        siglip.forward * (2 if "und_encoder" in flops.recompute else 1) + (siglip.backward if siglip_trains else 0.0))
    logits = counts.text_targets * text.vocab_size + counts.image_targets * config.vq_config.num_embeddings
    return MicroBatchWork(matmuls=matmuls, attention_flops=flops.parts["llm_attention"] + recomputed_attention,
                          memory_bytes=llm_bytes + siglip_bytes + logits * LOGIT_TRAFFIC_BYTES,
                          model_flops=flops.model, tokens=counts.real_tokens)


def edge_collectives(work: Workload, setting: Setting, trainable: int, cluster: Cluster) -> tuple[Collective, ...]:
    """What no compute hides: the step's first gather (one decoder layer, before the first forward) and its last
    gradient bucket's reduction (after the last backward)."""
    multi = cluster.nodes > 1
    last = setting.grad_bytes * min(setting.zero.reduce_bucket, trainable)
    if setting.sharding == "zero2":
        return (Collective("all-reduce", "last bucket", last, cluster.world, multi, 1),)
    group = cluster.node if setting.sharding == "mics" else cluster.world
    return (Collective("all-gather", "first layer", BF16 * work.params.decoder_layer, cluster.world, multi, 1),
            Collective("reduce-scatter", "last bucket", last, group, multi and setting.sharding != "mics", 1))


def performance_row(work: Workload, setting: Setting, cluster: Cluster, ops: Operations = TRAINING_RUN,
                    measured: Measured | None = None) -> PerformanceRow:
    """`setting` costed on `cluster`; its micro-batches must divide the step (the batch plan's check)."""
    stage = work.stage
    accumulation = stage.rows_per_step // cluster.world // setting.micro_batch_rows
    counts = expected_counts(stage, setting.micro_batch_rows)
    flops = training_flops(counts, work.config, stage.trainable, setting.checkpointing)
    units, gathers = setting_gathers(work, setting)
    trainable = sum(u.trainable for u in units)
    first = micro_batch_collectives(setting, gathers, trainable, cluster, True)
    later = micro_batch_collectives(setting, gathers, trainable, cluster, False)
    boundary = step_boundary_collectives(setting, trainable, cluster)
    step = StepWork(micro_batch=janus_micro_batch(work, counts, setting.checkpointing), micro_batches=accumulation,
                    first=tuple(first), later=tuple(later), edges=edge_collectives(work, setting, trainable, cluster),
                    boundary=tuple(boundary), trainable_shard=trainable / cluster.world,
                    saved_bytes=(SAVED_BYTES_ALL * work.params.total + SAVED_BYTES_TRAINABLE * trainable)
                    / cluster.world)
    prediction = predict(step, cluster, ops, work.config.text_config.hidden_size, measured)
    mid = prediction.mid
    memory = estimate_memory(work, setting, cluster.world, cluster.gpus_per_node, gathers.peak_held)
    model_flops = cluster.world * accumulation * flops.model
    collectives = [(c, n) for c, n in [(c, 1) for c in first] + [(c, accumulation - 1) for c in later]
                   + [(c, 1) for c in boundary] if n and c.full_bytes]
    return PerformanceRow(
        setting=setting, accumulation=accumulation,
        model_flops=model_flops, hardware_flops=cluster.world * accumulation * flops.hardware,
        flops_by_part={k: cluster.world * accumulation * v for k, v in flops.parts.items()},
        collectives=collectives, compute_s=mid.compute_s, comm_s=mid.comm_s, boundary_s=mid.exposed_s,
        step_s=mid.step_s, mfu=model_flops / (mid.step_s * cluster.world * cluster.gpu.peak_flops),
        tokens_per_s=stage.rows_per_step * stage.seq_len / mid.step_s,
        days=stage.train_steps * mid.step_s / 86400, memory=memory, fits=memory.total <= cluster.gpu.memory,
        available=setting.sharding not in UNAVAILABLE, prediction=prediction, train_steps=stage.train_steps)


def bucket_choices(work: Workload) -> tuple[ZeroSizes, ZeroSizes]:
    """Today's sizes (the width's defaults, as the launchers fill the templates), and the lever: one decoder
    layer's parameters for both buckets."""
    today = zero_defaults(work.config.text_config.hidden_size)
    layer = max(work.params.decoder_layer, MIN_BUCKET)
    return today, replace(today, reduce_bucket=layer, prefetch_bucket=layer)


def performance_rows(work: Workload, cluster: Cluster, micro_batches: tuple[int, ...] = (1, 2, 4),
                     checkpointing: tuple[bool, ...] = (True, False), sizes: tuple[ZeroSizes, ...] | None = None,
                     frozen_choices: tuple[str, ...] = FROZEN_WEIGHTS, ops: Operations = TRAINING_RUN,
                     measured: Measured | None = None) -> list[PerformanceRow]:
    """Every sharding x micro-batch x checkpointing x ZeRO sizes x frozen-weights choice whose micro-batches divide
    the step, each with gradients reduced in fp32 where that costs no step time (the reduce-scatter stays hidden under
    compute: at most FP32_FREE more) and still fits, otherwise in bf16 (DeepSpeed's default for a bf16 model)."""
    stage = work.stage
    sizes = sizes or bucket_choices(work)
    per_rank = stage.rows_per_step // cluster.world
    rows = []
    for ckpt in checkpointing:
        # ZeRO-2 keeps every weight whole (one row); with nothing frozen gathered (Stage III) persisted is partitioned.
        units = workload_units(work, sizes[0].persistence_threshold, ckpt)
        frozen_gathered = any(u.gathered and not u.trainable for u in units)
        frozen_for = {s: ("whole",) if s == "zero2" else tuple(f for f in frozen_choices
                                                               if f != "persisted" or frozen_gathered)
                      for s in SHARDINGS}
        for mb in micro_batches:
            if per_rank < mb or per_rank % mb or stage.rows_per_step % cluster.world:
                continue
            for sharding, zero in product(SHARDINGS, sizes):
                for frozen in frozen_for[sharding]:
                    hpz = cluster.node if sharding == "zero3-hpz" else 1
                    bf16, fp32 = (performance_row(work, Setting(sharding, mb, ckpt, zero, frozen, grad_bytes, hpz),
                                                  cluster, ops, measured) for grad_bytes in (BF16, FP32))
                    fp32_free = fp32.step_s <= bf16.step_s * (1 + FP32_FREE) and fp32.fits
                    rows.append(fp32 if fp32_free else bf16)
    return rows


def recommended(rows: list[PerformanceRow]) -> PerformanceRow | None:
    """The fastest available choice that fits memory (of equally fast ones, one reducing gradients in fp32, then the
    one needing least memory)."""
    usable = [r for r in rows if r.fits and r.available]
    return min(usable, key=lambda r: (round(r.step_s, 3), r.setting.grad_bytes != FP32, r.memory.total),
               default=None)


def recommended_template(row: PerformanceRow) -> dict:
    """zero3_bf16.json with the row's sharding and buckets: save it and pass it as --ds-config."""
    config = json.loads(template_path("zero3_bf16").read_text())
    zero, setting = config["zero_optimization"], row.setting
    # as costed; the persistence threshold and live/reuse limits are the template's (the plan costs those)
    zero["reduce_bucket_size"] = setting.zero.reduce_bucket
    zero["stage3_prefetch_bucket_size"] = setting.zero.prefetch_bucket
    if setting.sharding == "zero3-hpz":
        zero["zero_hpz_partition_size"] = setting.hpz
    if setting.grad_bytes == FP32:
        config["communication_data_type"] = "fp32"  # each bf16 gradient cast to fp32, then reduce-scattered
    if setting.sharding == "zero2":
        zero["stage"] = 2
        for key in [k for k in zero if k.startswith("stage3_")]:
            del zero[key]
    return config


def cluster_line(cluster: Cluster) -> str:
    """The GPUs and links a plan is for."""
    gpu, links = cluster.gpu, cluster.links
    return (f"{cluster.nodes} x {cluster.gpus_per_node} {gpu.name} ({gpu.memory / GIB:.0f} GiB, "
            f"{gpu.peak_flops / 1e12:.0f} TFLOP/s bf16), NVLink {links.nvlink_bus_bytes_per_s / 1e9:.0f} GB/s bus in "
            f"node, {links.nics_per_node} x {links.nic_gbps:g} Gb/s NICs per node "
            f"({links.node_bytes_per_s / 1e9:.0f} GB/s across nodes)")


def span(low: float, high: float, fmt: str) -> str:
    return f"{low:{fmt}}-{high:{fmt}}"


def format_performance_plan(rows: list[PerformanceRow], cluster: Cluster, stage_name: str,
                            this_run: PerformanceRow | None = None) -> str:
    """The plan's table, the recommended choice with its bytes per collective and FLOPs by part, and the assumptions.
    `this_run` (a run's --ds-config) is marked, and shown as a row of its own where no alternative has its setting.
    Times are the model's central values; `MFU range` and `days range` its range (slow and fast ends)."""
    best = recommended(rows)
    head = f"Performance plan, {stage_name}, {cluster_line(cluster)}"
    out = [head,
           f"  {'sharding':<10} {'frozen':<11} {'rows/mb':>7} {'accum':>5} {'ckpt':>4} {'grads':>5} {'bucket M':>8} "
           f"{'compute s':>9} {'comm s':>7} {'step s':>7} {'MFU':>6} {'tok/s':>9} {'days':>7} {'GiB/GPU':>8} "
           f"{'MFU range':>11} {'days range':>11}  note"]
    # An unavailable sharding is shown once, its best row, for comparison.
    shown = [r for r in rows if r.available] + [
        min((r for r in rows if r.setting.sharding == name and r.fits), key=lambda r: r.step_s)
        for name in UNAVAILABLE if any(r.setting.sharding == name and r.fits for r in rows)]
    if this_run is not None and not any(r.setting == this_run.setting for r in shown):
        shown.append(this_run)
    for r in sorted(shown, key=lambda r: r.step_s):
        s = r.setting
        notes = [UNAVAILABLE.get(s.sharding, "" if r.fits else "does not fit")]
        if this_run is not None and s == this_run.setting:
            notes.append("this run (--ds-config)")
        note = ", ".join(n for n in notes if n)
        mark = "*" if r is best else " "
        ckpt = "on" if s.checkpointing else "off"
        grads = "fp32" if s.grad_bytes == FP32 else "bf16"
        mfu_low, mfu_high = r.mfu_range
        days_fast, days_slow = r.days_range
        out.append(f"{mark} {s.sharding:<10} {s.frozen_weights:<11} {s.micro_batch_rows:>7} {r.accumulation:>5} "
                   f"{ckpt:>4} {grads:>5} {s.zero.reduce_bucket / 1e6:>8.1f} {r.compute_s:>9.2f} {r.comm_s:>7.2f} "
                   f"{r.step_s:>7.2f} {r.mfu:>6.1%} {r.tokens_per_s:>9.0f} {r.days:>7.1f} "
                   f"{r.memory.total / GIB:>8.1f} {span(100 * mfu_low, 100 * mfu_high, '.0f') + '%':>11} "
                   f"{span(days_fast, days_slow, '.1f'):>11}  {note}".rstrip())
    if best is None:
        out.append("No choice fits memory: add nodes or a larger GPU.")
    else:
        s = best.setting
        mfu_low, mfu_high = best.mfu_range
        days_fast, days_slow = best.days_range
        measured = "measured" if best.prediction and best.prediction.measured else "modelled"
        out.append(f"Recommended (*): {s.sharding}, frozen weights {s.frozen_weights}, "
                   f"{s.micro_batch_rows} row(s) per micro-batch, "
                   f"checkpointing {'on' if s.checkpointing else 'off'}, gradients reduced in "
                   f"{'fp32' if s.grad_bytes == FP32 else 'bf16'}, buckets of {s.zero.reduce_bucket:,} elements: "
                   f"MFU {best.mfu:.1%} ({mfu_low:.0%}-{mfu_high:.0%}), {best.days:.1f} days "
                   f"({days_fast:.1f}-{days_slow:.1f}); compute rate {measured}, communication modelled")
        # varlen: the GPU kernel for packed samples (sdpa runs one small kernel per sample and layer)
        flags = f"--rows-per-micro-batch {s.micro_batch_rows} --attention varlen" + (
            " --gradient-checkpointing" if s.checkpointing else "") + (
            " --frozen-weights persisted" if s.frozen_weights == "persisted" else "")
        out.append(f"  run it: {flags} --ds-config FILE, FILE holding "
                   f"{json.dumps(recommended_template(best), separators=(',', ':'))}")
        out.append("  per step, per GPU, bytes sent by collective:")
        out += [f"    {k:<58} {v / 1e9:>8.2f} GB" for k, v in best.bytes_by_kind.items()]
        out.append(f"  per step, FLOPs by part (whole job, model {best.model_flops:.3g}, with recompute "
                   f"{best.hardware_flops:.3g}):")
        out += [f"    {k:<20} {v:.3g}" for k, v in best.flops_by_part.items() if v]
    out += ["Assumptions (the calibrated model, docs/performance-plan.md): matmuls at the GPU's sustained GEMM rate "
            f"x {MATMUL_IN_MODEL:.0%} x their shape's efficiency, attention at FlashAttention's share of peak, norms, "
            "activations, RoPE, cross-entropy and the optimizer at HBM bandwidth; collectives on NCCL's ring costs at "
            f"NVLink's bus bandwidth in a node and the node's NIC aggregate across nodes (+{RING_BASE_LATENCY * 1e6:g} "
            f"us a call, {NETWORK_STEP_LATENCY * 1e6:g} us per step that crosses nodes); communication overlaps "
            f"compute, which it slows by {NCCL_CONTENTION:.0%} while both run; the first gather and the last "
            "reduction of a step are exposed; saves amortised over --save-every; ranges: compute and network "
            f"{SPREAD:.0%} either way (the calibration's largest error). ZeRO-2 all-reduces its gradients (DeepSpeed's "
            "default); persisted frozen weights are gathered once per step (DeepSpeed's optimizer step partitions "
            "every parameter), in the node under hpZ, and held whole; gradients reduced in fp32 where that costs "
            f"under {FP32_FREE:.1%} of step time and fits, else in bf16; rows packed full with the stage's typical "
            "samples; memory adds the worst row's logits (all text), full head gradients, "
            f"{CUDA_CONTEXT / GIB:g} GiB CUDA context, {NCCL_PER_GROUP / GIB:g} GiB NCCL per communicator and a "
            f"{FRAGMENTATION:.0%} fragmentation margin."]
    return "\n".join(out)
