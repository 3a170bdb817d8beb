"""Reading DeepSpeed's checkpoint files without running code from them.

DeepSpeed writes its checkpoints with `torch.save` (pickle) and reads them back with `torch.load(weights_only=False)`
in some thirty places (its engine, ZeRO-3's universal load, zero_to_fp32, ds_to_universal): a pickle can name any
function to call, so a forged `*.pt` file would run its payload on load. Here every such load is made
`weights_only=True`: torch's restricted unpickler, which builds tensors, plain containers and numbers, and only the
few other types listed in ALLOWED, found by saving tiny ZeRO-2 and ZeRO-3 checkpoints (and their universal form) and
loading them back. Anything else in a file is refused before it is built (UnsafeCheckpoint), whoever wrote it.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

# What DeepSpeed 0.19.8 pickles besides tensors and containers: the ZeRO stage (an IntEnum) and the loss scaler's
# state (a plain object: numbers only; bf16 and fp32 runs save the static one) in every optimizer file, and, under
# ZeRO-1/2, each parameter's fragment address (a namedtuple of two ints).
ALLOWED = [ZeroStageEnum, LossScaler, fragment_address]
# torch reads it at every torch.load and lets it override an explicit `weights_only=False` (torch/serialization.py).
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holding a pickled object outside ALLOWED: refused before it is built."""


@contextmanager
def weights_only_loads(what: str | Path) -> Iterator[None]:
    """Every `torch.load` inside runs with weights_only=True and ALLOWED, even DeepSpeed's that pass
    `weights_only=False` themselves; a refused file raises UnsafeCheckpoint naming `what` and the object.

    Through torch's own switch, set for the duration, rather than by patching DeepSpeed's modules: one place covers
    every call site, including ones a DeepSpeed upgrade adds. The process loads nothing else meanwhile (a load is
    a phase of its own, before training or export writes anything)."""
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with allowed_globals():
            yield
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpoint(f"{what}: refused to load, a file holds a pickled object that is not plain data "
                               f"({refused_global(error)}); such a file can run code when loaded, and this "
                               "project's checkpoints never hold one") from None
    finally:
        if before is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = before


def refused_global(error: pickle.UnpicklingError) -> str:
    """What torch's many-line weights-only message says was refused, in a few words."""
    named = re.search(r"GLOBAL [\w.]+", str(error))
    if named:
        return f"{named[0]} is not allowed"
    said = re.search(r"WeightsUnpickler error: ([^\n]+)", str(error))
    return said[1].strip() if said else type(error).__name__


def allowed_globals() -> torch.serialization.safe_globals:
    """torch's `safe_globals(ALLOWED)`, safe to nest: torch's removes its globals on exit even where an enclosing
    one had added them (seen: the engine's load inside `weights_only_loads` emptied the allow-list for the
    universal load that followed), so only the ones not yet allowed are added, and removed."""
    allowed = torch.serialization.get_safe_globals()
    return torch.serialization.safe_globals([g for g in ALLOWED if g not in allowed])


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading with weights_only=True and ALLOWED (its own passes False)."""

    def load(self, path: str, map_location=None):
        with allowed_globals():
            return torch.load(path, map_location=map_location, weights_only=True)


def use_weights_only_loads(engine) -> None:
    """Give a DeepSpeed engine the weights-only checkpoint engine, saving as its own did."""
    saving = engine.checkpoint_engine
    if not isinstance(saving, TorchCheckpointEngine):
        raise TypeError(f"expected DeepSpeed's TorchCheckpointEngine, got {type(saving).__name__}: its loads would "
                        "not be weights-only")
    safe = WeightsOnlyCheckpointEngine()
    safe.zipfile_serialization = saving.zipfile_serialization
    engine.checkpoint_engine = safe
