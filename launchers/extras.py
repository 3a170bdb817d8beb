"""The installed commands and launchers: a training run's first line, and a missing extra said as the `pip install`
that adds it (model/extras.py)."""

from __future__ import annotations

import os
import sys

from model.extras import call

# Commands whose stdout is their answer (a help text, a plan, a written file's line): no start-up line before it.
ANSWERING_FLAGS = ("-h", "--help", "--dry-run", "--write-ds-config")


def announce_training(argv: list[str]) -> None:
    """A training run's first line, printed before the imports: torch, transformers and DeepSpeed take 10-20 s to
    import, and a launch silent that long looks hung. Rank 0 only (the launchers set RANK)."""
    if os.environ.get("RANK", "0") == "0" and not any(a.split("=")[0] in ANSWERING_FLAGS for a in argv):
        print("start-up  importing torch, transformers and DeepSpeed", flush=True)


def train_stage(stage: int | None) -> None:
    """launchers/stageN.py (`stage`) and `janus-train --stage N ...` (None)."""
    announce_training(sys.argv[1:])
    call("pipeline.train:main", stage=stage)


def train() -> None:
    """`janus-train --stage N ...`."""
    train_stage(None)


def export() -> None:
    """`janus-export ...`."""
    call("pipeline.export:main")


def preprocess() -> None:
    """`janus-preprocess TASK ...`."""
    call("preprocess.cli:cli")
