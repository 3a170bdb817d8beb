"""DeepSpeed configs: the JSON templates in ds_configs/ with the numbers that depend on the run filled in.

transformers' "auto" values cannot be used: its integration looks for a top-level `hidden_size`, and
Janus keeps it in `text_config`. So bucket sizes are filled here from the model width, and batch
sizes from the stage's rows per step and the world size, after checking the combination is possible.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib.resources import files
from pathlib import Path

# The templates are package data of `ds_configs`: found the same way from a checkout and from an installed wheel.
DS_CONFIGS = Path(str(files("ds_configs")))


@dataclass(frozen=True)
class BatchPlan:
    rows_per_step: int         # global: packed rows of seq_len tokens per optimizer step (Table 2's batch)
    world_size: int            # data-parallel ranks
    rows_per_micro_batch: int  # per rank per forward
    accumulation_steps: int


def working_node_counts(rows_per_step: int, gpus_per_node: int, rows_per_micro_batch: int) -> list[int]:
    """Node counts whose data-parallel size divides the step into whole micro-batches on every rank."""
    counts = []
    for nodes in range(1, rows_per_step // gpus_per_node + 1):
        world = nodes * gpus_per_node
        if rows_per_step % world == 0 and (rows_per_step // world) % rows_per_micro_batch == 0:
            counts.append(nodes)
    return counts


def batch_plan(rows_per_step: int, world_size: int, rows_per_micro_batch: int, gpus_per_node: int = 8) -> BatchPlan:
    """Micro-batches and accumulation for a step; an impossible combination is refused before any model is built."""
    def refuse(why: str) -> None:
        nodes = working_node_counts(rows_per_step, gpus_per_node, rows_per_micro_batch)
        raise ValueError(f"{why}. With {gpus_per_node} GPUs per node and {rows_per_micro_batch} row(s) per "
                         f"micro-batch, node counts that work: {', '.join(map(str, nodes)) or 'none'}")

    if world_size > rows_per_step:
        refuse(f"{rows_per_step} rows per step cannot feed {world_size} data-parallel ranks (each needs at least "
               f"one row per step)")
    if rows_per_step % world_size:
        refuse(f"{rows_per_step} rows per step do not split evenly over {world_size} ranks")
    per_rank = rows_per_step // world_size
    if per_rank % rows_per_micro_batch:
        refuse(f"{per_rank} rows per rank per step are not a whole number of {rows_per_micro_batch}-row micro-batches")
    return BatchPlan(rows_per_step, world_size, rows_per_micro_batch, per_rank // rows_per_micro_batch)


# Bucket floor, in elements (4 MiB of fp32). Without it the tiny preset (h*h = 4,096) sends ~60 reduce-scatters
# a step and a 2-rank CPU step took ~30% longer; 1b and 7b (h*h = 4.2M, 16.8M) are above it.
MIN_BUCKET = 1 << 20
# DeepSpeed's own defaults (deepspeed.runtime.zero.config), which zero3_bf16.json also writes out.
MAX_LIVE_PARAMETERS = 10 ** 9
MAX_REUSE_DISTANCE = 10 ** 9


@dataclass(frozen=True)
class ZeroSizes:
    """The ZeRO sizes a run uses, in elements; `ZERO_KEYS` names each one's key in `zero_optimization`."""

    reduce_bucket: int
    prefetch_bucket: int
    persistence_threshold: int
    max_live: int = MAX_LIVE_PARAMETERS
    reuse_distance: int = MAX_REUSE_DISTANCE


ZERO_KEYS = {"reduce_bucket": "reduce_bucket_size", "prefetch_bucket": "stage3_prefetch_bucket_size",
             "persistence_threshold": "stage3_param_persistence_threshold",
             "max_live": "stage3_max_live_parameters", "reuse_distance": "stage3_max_reuse_distance"}


def zero_defaults(hidden_size: int) -> ZeroSizes:
    """The sizes for a model width where a template leaves them open: transformers' "auto" rule (reduce bucket h*h,
    prefetch bucket 0.9*h*h, persistence threshold 10*h), buckets floored at MIN_BUCKET."""
    return ZeroSizes(reduce_bucket=max(hidden_size * hidden_size, MIN_BUCKET),
                     prefetch_bucket=max(int(0.9 * hidden_size * hidden_size), MIN_BUCKET),
                     persistence_threshold=10 * hidden_size)


def filled_zero(zero: dict, hidden_size: int) -> dict:
    """A template's `zero_optimization` with every size it leaves as a placeholder, or out, filled from the width.

    A number in the template wins (the dry run's recommended template writes them). ZeRO-1/2 keep every weight whole:
    nothing is gathered or persisted, so no stage3_ key is added."""
    defaults, stage3 = zero_defaults(hidden_size), zero.get("stage") == 3
    left_open = {key: getattr(defaults, field) for field, key in ZERO_KEYS.items()
                 if not is_size(zero.get(key)) and (stage3 or not key.startswith("stage3_"))}
    return {**zero, **left_open}


def zero_sizes(zero: dict, hidden_size: int) -> ZeroSizes:
    """The sizes a template's `zero_optimization` runs with: its numbers, the width's defaults for the rest (under
    ZeRO-2 the stage3_ ones are never used)."""
    return replace(zero_defaults(hidden_size),
                   **{field: int(zero[key]) for field, key in ZERO_KEYS.items() if is_size(zero.get(key))})


def is_size(value: object) -> bool:
    """A number, not a placeholder string (nor a bool, which JSON's true would be)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def template_path(template: str | Path) -> Path:
    """A DeepSpeed template: a JSON file, or the name of one in ds_configs/."""
    path = Path(template)
    if path.is_file():
        return path
    named = DS_CONFIGS / f"{template}.json"
    if not named.is_file():
        names = sorted(p.stem for p in DS_CONFIGS.glob("*.json"))
        raise FileNotFoundError(f"{template}: neither a JSON file nor one of {', '.join(names)}")
    return named


def deepspeed_config(template: str | Path, plan: BatchPlan, *, hidden_size: int, learning_rate: float,
                     betas: list[float], weight_decay: float, eps: float, grad_clip: float) -> dict:
    """A template from ds_configs/ (a name or a path) with the run's numbers filled in.

    With more than one micro-batch per step, gradients accumulate in fp32 (`data_types.grad_accum_dtype`) unless
    the template names a dtype: DeepSpeed otherwise accumulates in the model's dtype, and under bf16 ZeRO-3 keeps
    the step's gradient partition in bf16, adding each micro-batch's reduced gradient into it with bf16 rounding
    (a later micro-batch's contribution below 2^-9 of the sum is lost). Filled here, not written in the templates:
    with one micro-batch there is nothing to accumulate and the fp32 buffer would cost 2 more bytes per trainable
    parameter / W for nothing."""
    config = json.loads(template_path(template).read_text())
    config["zero_optimization"] = filled_zero(config.get("zero_optimization", {}), hidden_size)
    config["train_micro_batch_size_per_gpu"] = plan.rows_per_micro_batch
    config["gradient_accumulation_steps"] = plan.accumulation_steps
    config["train_batch_size"] = plan.rows_per_step
    config["gradient_clipping"] = grad_clip
    if plan.accumulation_steps > 1:
        config["data_types"] = {"grad_accum_dtype": "fp32", **config.get("data_types", {})}  # the template's wins
    params = config.setdefault("optimizer", {"type": "AdamW", "params": {"torch_adam": True}})["params"]
    params.update(lr=learning_rate, betas=list(betas), weight_decay=weight_decay, eps=eps)
    return config
