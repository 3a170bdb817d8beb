"""The performance plan: per step FLOPs, bytes per collective, step time, MFU, days and memory per GPU, for every
sharding choice, and the one to run with the DeepSpeed template that runs it.

Cost model (assumptions, printed with the table and in the README):
- collectives as collectives.py costs them, on the gathers gathers.py traces;
- compute runs at `MATMUL_EFFICIENCY` of the GPU's bf16 peak on the hardware FLOPs (model FLOPs from
  pipeline/metrics.py plus checkpointing's recompute);
- compute and parameter/gradient communication overlap fully (prefetch and overlap_comm): a micro-batch takes
  max(compute, communication); what runs at the step boundary (ZeRO-2's weight all-gather) adds to it;
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
from pipeline.metrics import BatchCounts, training_flops
from pipeline.planning.collectives import (
    HOP_LATENCY_INTER,
    Cluster,
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

MATMUL_EFFICIENCY = 0.7      # share of bf16 peak large bf16 matmuls reach on these GPUs
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
    """One setting costed for one optimizer step on a cluster."""

    setting: Setting
    accumulation: int
    model_flops: float          # one step, whole job
    hardware_flops: float
    flops_by_part: dict
    collectives: list           # one step, per GPU: (Collective, times per step)
    compute_s: float
    comm_s: float
    boundary_s: float
    step_s: float
    mfu: float
    tokens_per_s: float
    days: float
    memory: MemoryEstimate      # per GPU; `.total` is what the plan prints
    fits: bool
    available: bool

    @property
    def bytes_by_kind(self) -> dict[str, float]:
        """Wire bytes per GPU per step, by collective and whether it crosses nodes."""
        out: dict[str, float] = {}
        for c, times in self.collectives:
            key = f"{c.kind} {c.what} ({'across nodes' if c.across_nodes else 'in node'})"
            out[key] = out.get(key, 0.0) + c.wire_bytes * times
        return out


def performance_row(work: Workload, setting: Setting, cluster: Cluster) -> PerformanceRow:
    """`setting` costed on `cluster`; its micro-batches must divide the step (the batch plan's check)."""
    stage = work.stage
    accumulation = stage.rows_per_step // cluster.world // setting.micro_batch_rows
    flops = training_flops(expected_counts(stage, setting.micro_batch_rows), work.config, stage.trainable,
                           setting.checkpointing)
    compute = accumulation * flops.hardware / (cluster.gpu.peak_flops * MATMUL_EFFICIENCY)
    units, gathers = setting_gathers(work, setting)
    trainable = sum(u.trainable for u in units)
    first = micro_batch_collectives(setting, gathers, trainable, cluster, True)
    later = micro_batch_collectives(setting, gathers, trainable, cluster, False)
    boundary = step_boundary_collectives(setting, trainable, cluster)
    comm = sum(c.seconds(cluster) for c in first) + (accumulation - 1) * sum(c.seconds(cluster) for c in later)
    boundary_s = sum(c.seconds(cluster) for c in boundary)
    step = max(compute, comm) + boundary_s
    memory = estimate_memory(work, setting, cluster.world, cluster.gpus_per_node, gathers.peak_held)
    model_flops = cluster.world * accumulation * flops.model
    collectives = [(c, n) for c, n in [(c, 1) for c in first] + [(c, accumulation - 1) for c in later]
                   + [(c, 1) for c in boundary] if n and c.full_bytes]
    return PerformanceRow(
        setting=setting, accumulation=accumulation,
        model_flops=model_flops, hardware_flops=cluster.world * accumulation * flops.hardware,
        flops_by_part={k: cluster.world * accumulation * v for k, v in flops.parts.items()},
        collectives=collectives, compute_s=compute, comm_s=comm, boundary_s=boundary_s, step_s=step,
        mfu=model_flops / (step * cluster.world * cluster.gpu.peak_flops),
        tokens_per_s=stage.rows_per_step * stage.seq_len / step,
        days=stage.train_steps * step / 86400, memory=memory, fits=memory.total <= cluster.gpu.memory,
        available=setting.sharding not in UNAVAILABLE)


def bucket_choices(work: Workload) -> tuple[ZeroSizes, ZeroSizes]:
    """Today's sizes (the width's defaults, as the launchers fill the templates), and the lever: one decoder
    layer's parameters for both buckets."""
    today = zero_defaults(work.config.text_config.hidden_size)
    layer = max(work.params.decoder_layer, MIN_BUCKET)
    return today, replace(today, reduce_bucket=layer, prefetch_bucket=layer)


def performance_rows(work: Workload, cluster: Cluster, micro_batches: tuple[int, ...] = (1, 2, 4),
                     checkpointing: tuple[bool, ...] = (True, False), sizes: tuple[ZeroSizes, ...] | None = None,
                     frozen_choices: tuple[str, ...] = FROZEN_WEIGHTS) -> list[PerformanceRow]:
    """Every sharding x micro-batch x checkpointing x ZeRO sizes x frozen-weights choice whose micro-batches divide
    the step, each with gradients reduced in fp32 where that costs no step time (the reduce-scatter stays hidden under
    compute) and still fits, otherwise in bf16 (DeepSpeed's default for a bf16 model)."""
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
                                                  cluster) for grad_bytes in (BF16, FP32))
                    fp32_free = fp32.step_s <= bf16.step_s and fp32.fits
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


def format_performance_plan(rows: list[PerformanceRow], cluster: Cluster, stage_name: str,
                            this_run: PerformanceRow | None = None) -> str:
    """The plan's table, the recommended choice with its bytes per collective and FLOPs by part, and the assumptions.
    `this_run` (a run's --ds-config) is marked, and shown as a row of its own where no alternative has its setting."""
    best = recommended(rows)
    head = (f"Performance plan, {stage_name}, {cluster.nodes} x {cluster.gpus_per_node} {cluster.gpu.name} "
            f"({cluster.gpu.memory / GIB:.0f} GiB, {cluster.gpu.peak_flops / 1e12:.0f} TFLOP/s bf16), "
            f"{cluster.intra_node_gbps:g} Gb/s in node, {cluster.inter_node_gbps:g} Gb/s across nodes per GPU")
    out = [head,
           f"  {'sharding':<10} {'frozen':<11} {'rows/mb':>7} {'accum':>5} {'ckpt':>4} {'grads':>5} {'bucket M':>8} "
           f"{'compute s':>9} {'comm s':>7} {'step s':>7} {'MFU':>6} {'tok/s':>9} {'days':>7} {'GiB/GPU':>8}  note"]
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
        out.append(f"{mark} {s.sharding:<10} {s.frozen_weights:<11} {s.micro_batch_rows:>7} {r.accumulation:>5} "
                   f"{ckpt:>4} {grads:>5} {s.zero.reduce_bucket / 1e6:>8.1f} {r.compute_s:>9.2f} {r.comm_s:>7.2f} "
                   f"{r.step_s:>7.2f} {r.mfu:>6.1%} {r.tokens_per_s:>9.0f} {r.days:>7.1f} "
                   f"{r.memory.total / GIB:>8.1f}  {note}")
    if best is None:
        out.append("No choice fits memory: add nodes or a larger GPU.")
    else:
        s = best.setting
        out.append(f"Recommended (*): {s.sharding}, frozen weights {s.frozen_weights}, "
                   f"{s.micro_batch_rows} row(s) per micro-batch, "
                   f"checkpointing {'on' if s.checkpointing else 'off'}, gradients reduced in "
                   f"{'fp32' if s.grad_bytes == FP32 else 'bf16'}, buckets of {s.zero.reduce_bucket:,} elements: "
                   f"MFU {best.mfu:.1%}, {best.days:.1f} days")
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
    out += ["Assumptions: rings move (g-1)/g of a collective per GPU at the group's link bandwidth, "
            f"+{HOP_LATENCY_INTER * 1e6:g} us per hop across nodes; compute at {MATMUL_EFFICIENCY:.0%} of bf16 peak on "
            "model FLOPs + recompute; compute and gathers/reduce-scatters overlap fully (step = max of the two, plus "
            "step-boundary collectives); ZeRO-2 all-reduces its gradients (DeepSpeed's default); persisted frozen "
            "weights are gathered once per step (DeepSpeed's optimizer step partitions every parameter), in the node "
            "under hpZ, and held whole; gradients reduced in fp32 where that keeps them hidden and fits (twice "
            "bf16's bytes), else in bf16; rows packed full with the stage's typical samples; memory adds the "
            f"worst row's logits (all text), full head gradients, {CUDA_CONTEXT / GIB:g} GiB CUDA context, "
            f"{NCCL_PER_GROUP / GIB:g} GiB NCCL per communicator and a {FRAGMENTATION:.0%} fragmentation margin."]
    return "\n".join(out)
