"""A measured step replaces the assumed compute rate: bench/train_step.py's JSON from a GPU run, read back into the
matmul efficiency that makes the model's compute of the same step take the measured time."""

from __future__ import annotations

import json
from pathlib import Path

from model.config import preset_config
from model.stages import STAGES
from pipeline.metrics import BatchCounts
from pipeline.planning.collectives import Cluster
from pipeline.planning.hardware import GPUS, gpu_for_device
from pipeline.planning.memory import param_counts, workload
from pipeline.planning.report import janus_micro_batch
from pipeline.planning.step_time import Measured, measured_matmul_efficiency


def result_efficiency(result: dict) -> tuple[str, int, float]:
    """(GPU type, matmul width, efficiency) of one bench result."""
    gpu = gpu_for_device(result["device"])
    config = preset_config(result["model"])
    config.text_config.num_hidden_layers = result["layers"]
    stage = STAGES[result["stage"]]
    counts = BatchCounts(**result["counts_per_step"])
    work = janus_micro_batch(workload(config, stage), counts, result["checkpointing"])
    trainable = param_counts(config, stage.trainable).trainable
    efficiency = measured_matmul_efficiency(work, trainable, Cluster(GPUS[gpu], 1, 1), result["step_seconds"])
    return gpu, config.text_config.hidden_size, efficiency


def measured_from(path: str | Path) -> Measured:
    """The best compute rate a bench file shows (its fastest backend and checkpointing choice: the one a run takes)."""
    results = json.loads(Path(path).read_text())
    if not results:
        raise ValueError(f"{path}: no bench results")
    found = [result_efficiency(r) for r in results]
    if len({(g, w) for g, w, _ in found}) > 1:
        raise ValueError(f"{path}: results from more than one GPU type or model width")
    gpu, width, efficiency = max(found, key=lambda f: f[2])
    return Measured(gpu=GPUS[gpu].name, width=width, matmul_efficiency=efficiency, source=str(path))
