"""Checkpoints that are either complete or ignored, resume as the default path, and stage hand-off.

Layout: OUTPUT/checkpoints/step-00001000/ holds DeepSpeed's files (every rank's ZeRO shards), one
`rank-{r}.pt` per rank (data-path state, RNG states) and, last, `COMPLETE`. DeepSpeed's own `latest`
is never written: its rank 0 writes it before the other ranks finish their shards, so a crash then
leaves it pointing at a torn checkpoint. Here every rank saves, all meet at a barrier, and only then
rank 0 writes `COMPLETE` (an atomic rename) and prunes old checkpoints. Resume takes the newest
directory with `COMPLETE`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"


def checkpoints_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def step_tag(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    root = checkpoints_dir(output)
    found = [p for p in root.glob("step-*") if (p / COMPLETE).is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(output: str | Path) -> Path | None:
    found = complete_checkpoints(output)
    return found[-1] if found else None


def due(step: int, save_every: int, last_step: int) -> bool:
    """Every `save_every` steps and at the stage's last step (a stop signal saves too: the loop asks)."""
    return step % save_every == 0 or step == last_step


def rng_state() -> dict:
    """The RNGs training draws from (the data path's randomness is seeded and positional, not drawn)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(engine, output: str | Path, step: int, rank_state: dict, keep_last: int) -> Path:
    """Collective: every rank writes its part; the checkpoint counts only once all have."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = step_tag(step)
    path = checkpoints_dir(output) / tag
    engine.save_checkpoint(str(checkpoints_dir(output)), tag=tag, client_state={"step": step}, save_latest=False)
    state = {**rank_state, "step": step, "world_size": world, "rng": rng_state()}
    tmp = path / f".rank-{rank}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / f"rank-{rank}.pt")
    dist.barrier()
    if rank == 0:
        marker = path / f".{COMPLETE}.tmp"
        marker.write_text(json.dumps({"step": step, "world_size": world}) + "\n")
        os.replace(marker, path / COMPLETE)
        for old in complete_checkpoints(output)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        for torn in checkpoints_dir(output).glob("step-*"):  # older, never completed
            if not (torn / COMPLETE).exists() and torn.name < tag:
                shutil.rmtree(torn, ignore_errors=True)
    dist.barrier()
    return path


def load(engine, path: Path) -> dict:
    """Restore DeepSpeed's state and return this rank's own state (data path, RNG, step)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    saved_world = json.loads((path / COMPLETE).read_text())["world_size"]
    if saved_world != world:
        raise ValueError(
            f"{path} was written by {saved_world} ranks, this run has {world}. Resume on {saved_world} ranks, or "
            f"start a new run from its weights with --init {path.parents[1]} (optimizer state and data position "
            f"are then fresh), or convert it with DeepSpeed's ds_to_universal and load it as a universal checkpoint")
    engine.load_checkpoint(str(path.parent), tag=path.name)
    # Our own file, written by this code: tensors and plain containers only.
    state = torch.load(path / f"rank-{rank}.pt", weights_only=True)
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state


def consolidate(run_dir: str | Path) -> Path:
    """A previous stage's latest complete checkpoint as a transformers-layout safetensors directory.

    Uses DeepSpeed's own ZeRO consolidation (frozen parameters included: they are saved by default) and
    checks it got every parameter. Rank 0 does the work once; the others wait and reuse it.
    """
    from safetensors.torch import save_file

    source = latest_checkpoint(run_dir)
    if source is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to start from")
    out = Path(run_dir) / "consolidated" / source.name
    if dist.get_rank() == 0 and not (out / COMPLETE).exists():
        state = consolidated_state(source)
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / "model.safetensors"))
        (out / COMPLETE).write_text(json.dumps({"from": str(source), "tensors": len(state)}) + "\n")
    dist.barrier()
    return out


def find_checkpoint(run_dir: str | Path, step: int | None = None) -> Path:
    """A run's complete checkpoint at `step`, or its latest; an error that lists what exists otherwise."""
    found = complete_checkpoints(run_dir)
    if step is not None:
        found = [p for p in found if p.name == step_tag(step)]
    if not found:
        have = ", ".join(p.name for p in complete_checkpoints(run_dir)) or "none"
        wanted = f"step {step}" if step is not None else "a complete checkpoint"
        raise FileNotFoundError(f"{run_dir}: no {wanted} (complete checkpoints: {have})")
    return found[-1]


def consolidated_state(source: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of one complete ZeRO checkpoint (any world size), in one process.

    DeepSpeed's own zero_to_fp32 merges every rank's shards without torch.distributed; frozen parameters are
    included because engine.save_checkpoint saves them by default (exclude_frozen_parameters=False), which a
    caller still checks against the model's key set.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (source / COMPLETE).is_file():
        raise FileNotFoundError(f"{source} is not a complete checkpoint (no {COMPLETE} marker)")
    state = get_fp32_state_dict_from_zero_checkpoint(str(source.parent), tag=source.name)
    # zero_to_fp32 may return views into a flat buffer: give each tensor its own storage for safetensors.
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
