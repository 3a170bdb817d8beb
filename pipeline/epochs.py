"""How many optimizer steps one pass over the --data manifests takes: what `--epochs` turns into --train-steps.

An epoch is every row of every drawn source seen once. The mixer draws each task at its share of --ratio and each
source at its weight within its task, so the sources run out at different steps: the one that takes longest to
go through at its share sets the epoch (the others wrap round and are seen again meanwhile). A step holds
--rows-per-step rows of --seq-len tokens; packing leaves a little of each row empty, so an epoch takes slightly more
steps than this count (a few percent; too-long samples dropped by the packer make it slightly fewer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import pyarrow.compute as pc

from model.manifest import Manifest, read_shard
from model.sample import GENERATION, TASKS


class DataConfig(Protocol):
    """What an epoch depends on, of the run's data section (pipeline/config.py's DataConfig, which imports this
    module)."""

    data: list[str]
    data_weights: list[float]
    ratio: list[float]
    ratio_unit: Literal["samples", "tokens"]
    seq_len: int
    eoi_is_target: bool


@dataclass(frozen=True)
class SourceSize:
    """A --data manifest's rows and the tokens they occupy in packed rows."""

    manifest: str
    task: str
    rows: int
    tokens: float


@dataclass(frozen=True)
class Epoch:
    steps: float          # optimizer steps for one pass over the slowest source
    slowest: SourceSize   # the source that sets it

    def line(self) -> str:
        return (f"1 epoch = {math.ceil(self.steps)} steps (every row of {self.slowest.manifest} once: "
                f"{self.slowest.rows:,} {self.slowest.task} rows)")


class EpochError(ValueError):
    """The --data manifests cannot say how long an epoch is (pipeline/config.py reports it as a ConfigError)."""


def row_tokens(manifest: Manifest, root: Path, eoi_is_target: bool) -> float:
    """Mean tokens a row occupies in a packed row, measured on the first shard: reading the list offsets of a
    memory-mapped shard is cheap, and every rank resolves the config (hashing every shard is the preflight's)."""
    if not manifest.shards or not manifest.rows_written:
        return 0.0
    table = read_shard(root / manifest.shards[0].file)
    if not table.num_rows:
        return 0.0
    tokens = pc.sum(pc.list_value_length(table.column("input_ids"))).as_py() or 0
    if manifest.task == GENERATION:  # the image's ids follow the prompt in the row (model/batch.py sample_length)
        image_ids = pc.sum(pc.list_value_length(table.column("image_ids"))).as_py() or 0
        tokens += image_ids + eoi_is_target * table.num_rows
    return tokens / table.num_rows


def source_sizes(data: DataConfig) -> list[SourceSize]:
    """Each --data manifest's rows, and its tokens estimated as rows x the mean row length of its first shard."""
    sizes = []
    for spec in data.data:
        path = Path(spec)
        try:
            manifest = Manifest.read(path)
            root = path if path.is_dir() else path.parent
            tokens = manifest.rows_written * row_tokens(manifest, root, data.eoi_is_target)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise EpochError(f"--data {spec}: cannot count its rows for --epochs ({error})") from None
        sizes.append(SourceSize(spec, manifest.task, manifest.rows_written, tokens))
    return sizes


def epoch(data: DataConfig, rows_per_step: int, sizes: list[SourceSize] | None = None) -> Epoch:
    """Steps per epoch: for each drawn source, its rows (or tokens, with --ratio-unit tokens) over what a step takes
    of it; the largest."""
    sizes = source_sizes(data) if sizes is None else sizes
    weights = data.data_weights or [1.0] * len(sizes)
    share = {task: r / sum(data.ratio) for task, r in zip(TASKS, data.ratio, strict=True)}
    within = {task: sum(w for s, w in zip(sizes, weights, strict=True) if s.task == task) for task in TASKS}
    # A source's part of everything drawn, in the ratio's unit.
    part = [share.get(s.task, 0.0) * w / within[s.task] for s, w in zip(sizes, weights, strict=True)]
    step_tokens = rows_per_step * data.seq_len
    if data.ratio_unit == "tokens":
        per_step = [p * step_tokens for p in part]
        amounts = [s.tokens for s in sizes]
    else:  # samples drawn per step: the step's tokens over the mean tokens of a drawn sample
        mean_tokens = sum(p * (s.tokens / s.rows) for p, s in zip(part, sizes, strict=True) if s.rows)
        samples = step_tokens / mean_tokens if mean_tokens else 0.0
        per_step = [p * samples for p in part]
        amounts = [float(s.rows) for s in sizes]
    steps = [(amount / rate, s) for amount, rate, s in zip(amounts, per_step, sizes, strict=True) if rate > 0]
    if not steps or not any(s.rows for _, s in steps):
        raise EpochError("--epochs: the --data manifests the --ratio draws from hold no rows")
    length, slowest = max(steps, key=lambda pair: pair[0])
    return Epoch(length, slowest)


def steps_for(epochs: float, one: Epoch) -> int:
    """--epochs as whole optimizer steps, rounded up (a part of an epoch still counts), at least 1."""
    return max(1, math.ceil(epochs * one.steps - 1e-9))
