"""A training run's directory (`--output`): every name a run writes there, and the functions that find them.

    OUTPUT/
      config.yaml          the resolved configuration (what `--resume`, `--init` of the next stage and export read)
      ds_config.json       the DeepSpeed config the engine was built with
      fingerprints.json    the tokenizer and VQ fingerprints, and the sha256 of every --data manifest
      metrics.jsonl        one JSON line per log step (rank 0)
      tensorboard/         TensorBoard event files: the log's scalars
        samples/           the sample grids and Q&A samples
      samples/             sample grids (PNG)
      checkpoints/step-N/  ZeRO checkpoints; a COMPLETE file marks the finished ones
        coverage.json      how many times each sample had been trained by then, summed over ranks (per task)
      consolidated/step-N/ a checkpoint merged into one safetensors file, for the next stage's --init

These names are the on-disk format of every run ever written: renaming one breaks resume and export of older runs.
"""

from __future__ import annotations

from pathlib import Path

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
FINGERPRINTS = "fingerprints.json"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SAMPLES = "samples"
CHECKPOINTS = "checkpoints"
CONSOLIDATED = "consolidated"
COVERAGE = "coverage.json"


def is_run_directory(path: str | Path) -> bool:
    """A training run's OUTPUT: its config.yaml and checkpoints/ (released weights have neither)."""
    return config_file(path).is_file() and checkpoints_dir(path).is_dir()


def config_file(run: str | Path) -> Path:
    return Path(run) / CONFIG


def ds_config_file(run: str | Path) -> Path:
    return Path(run) / DS_CONFIG


def fingerprints_file(run: str | Path) -> Path:
    return Path(run) / FINGERPRINTS


def metrics_file(run: str | Path) -> Path:
    return Path(run) / METRICS


def tensorboard_dir(run: str | Path) -> Path:
    return Path(run) / TENSORBOARD


def samples_dir(run: str | Path) -> Path:
    return Path(run) / SAMPLES


def samples_tensorboard_dir(run: str | Path) -> Path:
    """Where the Sampler's TensorBoard events go: a folder of their own under the run's TensorBoard directory.

    Not beside the Monitor's event file: a live TensorBoard (--reload_multifile false, its default) polls only the
    newest event file of a folder, so a second writer there would freeze the scalar curves until TensorBoard
    restarts. `tensorboard --logdir RUN/tensorboard` shows this folder as a run of its own."""
    return tensorboard_dir(run) / SAMPLES


def checkpoints_dir(run: str | Path) -> Path:
    return Path(run) / CHECKPOINTS


def coverage_file(checkpoint: str | Path) -> Path:
    """A checkpoint's coverage summary (RUN/checkpoints/step-N/coverage.json): saved and pruned with it."""
    return Path(checkpoint) / COVERAGE


def consolidated_dir(run: str | Path, checkpoint_name: str) -> Path:
    """Where checkpoint `checkpoint_name` (step-N) of `run` is kept merged into one safetensors file."""
    return Path(run) / CONSOLIDATED / checkpoint_name


def run_of_checkpoint(checkpoint: str | Path) -> Path:
    """The run directory a checkpoint directory (RUN/checkpoints/step-N) belongs to."""
    return Path(checkpoint).resolve().parents[1]
