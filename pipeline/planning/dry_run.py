"""`--dry-run`: the batch plan (refused if impossible), the memory per GPU of the run's own setting and the
performance plan of every sharding choice, building nothing.

The run's setting is its flags (rows per micro-batch, checkpointing, --frozen-weights) and the DeepSpeed template it
would train with: --ds-config, or zero3_bf16 (the GPU default), with its placeholders filled as the launchers fill
them (pipeline/ds_config.py). The memory table is that setting's, and so is the plan's row marked for --ds-config.
"""

from __future__ import annotations

import json
import os
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import torch
from transformers import JanusConfig

from model.config import model_size
from model.stages import stage_for
from pipeline.config import ClusterConfig, ConfigError, TrainConfig
from pipeline.ds_config import template_path, zero_sizes
from pipeline.planning.collectives import Cluster
from pipeline.planning.hardware import gpu_named, network_for
from pipeline.planning.memory import (
    BF16,
    FP32,
    Setting,
    Workload,
    deepspeed_estimate,
    format_memory,
    nodes_and_gpus,
    workload,
)
from pipeline.planning.report import format_performance_plan, performance_row, performance_rows
from pipeline.planning.step_time import Measured, Operations
from pipeline.preflight import checked_plan

GPU_TEMPLATE = "zero3_bf16"  # what pipeline/engine.py's run_deepspeed_config takes on GPU without --ds-config
COMMUNICATION_BYTES = {"fp32": FP32, "bf16": BF16, "fp16": BF16}
# One rank's data loader, packed tokens/s by stage: bench/loader.py with 2 decode threads on the 2-core CPU machine
# (docs/benchmarks.md). A GPU node has more cores per rank: a floor, and far above what a 7B step eats (~4K/s/GPU).
LOADER_TOKENS_PER_S = {1: 498e3, 2: 438e3, 3: 333e3}


def planned_cluster(planned: ClusterConfig, nodes: int, per_node: int) -> Cluster:
    """The cluster to cost: the GPU type's typical node (hardware.py), with --nics-per-node, --nic-gbps and
    --nvlink-gbps replacing its figures where given."""
    gpu = gpu_named(planned.gpu)
    return Cluster(gpu, nodes, per_node, network_for(gpu, planned.nics_per_node, planned.nic_gbps,
                                                     planned.nvlink_gbps))


def planned_world_size(planned: ClusterConfig, per_node: int) -> int:
    """--world-size, or --nodes x --gpus-per-node; both must agree when both are given."""
    world_size, nodes = planned.world_size, planned.nodes
    if world_size and nodes and world_size != nodes * per_node:
        raise ConfigError(f"--world-size {world_size} is not --nodes {nodes} x --gpus-per-node {per_node}")
    if not (world_size or nodes):
        raise ConfigError("--dry-run needs --world-size or --nodes (the cluster to plan for)")
    return world_size or nodes * per_node


def run_setting(config: TrainConfig, work: Workload, cluster: Cluster) -> Setting:
    """The setting this run trains with: its template's ZeRO stage, sizes, hpZ group and gradient dtype, and its
    flags. Parameters are costed in bf16 whatever the template (zero3_cpu.json's fp32 is for CPU tests)."""
    name = config.system.ds_config or GPU_TEMPLATE
    template = json.loads(template_path(name).read_text())
    zero = template.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (2, 3):
        raise ConfigError(f"--ds-config {name}: ZeRO stage {stage}; --dry-run costs stages 2 and 3")
    communication = template.get("communication_data_type")
    if communication is not None and communication not in COMMUNICATION_BYTES:
        raise ConfigError(f"--ds-config {name}: communication_data_type {communication!r} is not one of "
                          f"{', '.join(COMMUNICATION_BYTES)}")
    # DeepSpeed cuts an hpZ group larger than the world to the world; hpZ is ZeRO-3's.
    hpz = min(int(zero.get("zero_hpz_partition_size", 1)), cluster.world) if stage == 3 else 1
    sharding = "zero2" if stage == 2 else "zero3-hpz" if hpz > 1 else "zero3"
    return Setting(sharding=sharding, micro_batch_rows=config.data.rows_per_micro_batch,
                   checkpointing=config.model.gradient_checkpointing,
                   zero=zero_sizes(zero, work.config.text_config.hidden_size),
                   frozen_weights="whole" if stage == 2 else config.system.frozen_weights,
                   grad_bytes=COMMUNICATION_BYTES.get(communication, BF16), hpz=hpz)


def dry_run(config: TrainConfig, planned: ClusterConfig, janus: JanusConfig, measured: Measured | None = None) -> str:
    """The dry run's report for the cluster `planned`: the batch plan, the run's memory per GPU, the performance
    plan. `janus`: the model's config, as start-up read it; `measured`: a measured compute rate that replaces the
    modelled one for its GPU type and width (`python -m pipeline.planning plan --measured`)."""
    world_size = planned_world_size(planned, config.system.gpus_per_node)
    batch = checked_plan(config, world_size)
    stage = replace(stage_for(config.stage, model_size(janus)),
                    ratio=tuple(config.data.ratio), trainable=tuple(config.optim.trainable),
                    seq_len=config.data.seq_len, rows_per_step=config.optim.rows_per_step,
                    train_steps=config.optim.train_steps)
    system = config.system
    nodes, per_node = nodes_and_gpus(world_size, system.gpus_per_node)
    cluster = planned_cluster(planned, nodes, per_node)
    ops = Operations(save_every=config.checkpoint.save_every, loader_tokens_per_s=LOADER_TOKENS_PER_S.get(config.stage))
    work = workload(janus, stage, name=config.model.model, lora=config.lora.settings())
    this_run = performance_row(work, run_setting(config, work, cluster), cluster, ops, measured)
    deepspeed_gpu, deepspeed_table = deepspeed_estimate(work.params.total, work.params.largest_module, world_size,
                                                        system.gpus_per_node)
    rows = performance_rows(work, cluster, ops=ops, measured=measured)
    return (f"Stage {config.stage}, model {config.model.model}: {batch.rows_per_step} rows/step over {world_size} "
            f"ranks = {batch.accumulation_steps} micro-batch(es) of {batch.rows_per_micro_batch} row(s) x "
            f"{config.data.seq_len} tokens per rank\n" + format_memory(this_run.memory, deepspeed_gpu, deepspeed_table)
            + "\n\n" + format_performance_plan(rows, cluster, f"Stage {config.stage} {config.model.model}",
                                               this_run if system.ds_config else None))


def write_run_config(config: TrainConfig, args: Namespace) -> str:
    """--write-ds-config: the DeepSpeed config this run would start with (the one it saves in its run directory),
    written to the flag's path; for --world-size (or --nodes) where given, else the launcher's WORLD_SIZE, else 1.
    Returns the line to print."""
    from pipeline.engine import run_deepspeed_config  # here: the planner itself never needs DeepSpeed

    planned = args.cluster.world_size or args.cluster.nodes
    world = planned_world_size(args.cluster, config.system.gpus_per_node) if planned else \
        int(os.environ.get("WORLD_SIZE", "1"))
    plan = checked_plan(config, world)
    try:
        ds = run_deepspeed_config(config, plan, args.model_config)
    except FileNotFoundError as error:
        raise ConfigError(f"--ds-config {error}") from None
    path = Path(args.write_ds_config)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ds, indent=2) + "\n")
    except OSError as error:
        raise ConfigError(f"--write-ds-config {path}: {error.strerror or error}") from None
    # The run's default template depends on the machine (engine.run_deepspeed_config): say so where that matters.
    cpu = "" if config.system.ds_config or torch.cuda.is_available() else \
        "; no GPU here, so the CPU template: give --ds-config zero3_bf16 for a GPU run"
    return (f"wrote {path} for {world} rank(s): {plan.accumulation_steps} micro-batch(es) of "
            f"{plan.rows_per_micro_batch} row(s) per rank per step{cpu}")
