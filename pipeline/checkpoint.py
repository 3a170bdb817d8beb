"""Checkpoints that are complete and intact or ignored, resume as the default path, and stage hand-off.

Layout: OUTPUT/checkpoints/step-00001000/ holds DeepSpeed's files (every rank's ZeRO shards), one
`rank-{r}.pt` per rank (data-path state, RNG states) and, last, `COMPLETE`. DeepSpeed's own `latest`
is never written: its rank 0 writes it before the other ranks finish their shards, so a crash then
leaves it pointing at a torn checkpoint. Here a re-save first removes the step's old `COMPLETE`, every
rank saves, all meet at a barrier, the files are hashed (each rank hashes its share), and only then rank 0
writes `COMPLETE` (an atomic rename) listing every file with its size and sha256, and prunes old checkpoints.

Resume takes the newest checkpoint whose files all match its `COMPLETE` (a flipped bit or a truncated file is
reported by name and skipped). Resuming from an older step sets newer ones aside in `checkpoints/abandoned/`:
a checkpoint is never deleted except by pruning, which keeps the step a run resumed from. DeepSpeed unpickles
its checkpoint files, so only checkpoints whose `COMPLETE` this code wrote are loaded unless the user says
they trust them (`--trust-checkpoint`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

COMPLETE = "COMPLETE"
WRITER = "janus-pipeline"  # in every COMPLETE this code writes
ABANDONED = "abandoned"


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


def save(engine, output: str | Path, step: int, rank_state: dict, keep_last: int, keep: Path | None = None) -> Path:
    """Collective: every rank writes its part; the checkpoint counts only once all have and every file is listed
    in its COMPLETE. Pruning keeps the `keep_last` newest and `keep` (the checkpoint the run resumed from)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = step_tag(step)
    path = checkpoints_dir(output) / tag
    if rank == 0 and (path / COMPLETE).exists():
        (path / COMPLETE).unlink()  # a re-save: the old marker must not vouch for a mix of new and old files
    dist.barrier()
    engine.save_checkpoint(str(checkpoints_dir(output)), tag=tag, client_state={"step": step}, save_latest=False)
    state = {**rank_state, "step": step, "world_size": world, "rng": rng_state()}
    tmp = path / f".rank-{rank}.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / f"rank-{rank}.pt")
    dist.barrier()
    files = file_records(path)
    if rank == 0:
        marker = path / f".{COMPLETE}.tmp"
        marker.write_text(json.dumps({"writer": WRITER, "step": step, "world_size": world, "files": files}) + "\n")
        os.replace(marker, path / COMPLETE)
        for old in complete_checkpoints(output)[:-keep_last] if keep_last > 0 else []:
            if keep is None or old.resolve() != keep.resolve():
                shutil.rmtree(old, ignore_errors=True)
        for torn in checkpoints_dir(output).glob("step-*"):  # older, never completed
            if not (torn / COMPLETE).exists() and torn.name < tag:
                shutil.rmtree(torn, ignore_errors=True)
    dist.barrier()
    return path


def _collective(collective: bool) -> bool:
    return collective and dist.is_initialized()


def _share(items: list[str], collective: bool = True) -> list[str]:
    """This rank's share of a list every rank holds alike (all of it when one process does the work)."""
    if not _collective(collective):
        return items
    return items[dist.get_rank()::dist.get_world_size()]


def _gathered(part: dict | list, collective: bool = True) -> list:
    if not _collective(collective):
        return [part]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return parts


def _files(path: Path) -> list[str]:
    return sorted(str(f.relative_to(path)) for f in path.rglob("*")
                  if f.is_file() and f.name != COMPLETE and not f.name.startswith("."))


def file_records(path: Path) -> dict[str, dict]:
    """Every file of a checkpoint with its size and sha256; collective, each rank hashing its share once."""
    from model.manifest import file_sha256

    mine = {name: {"bytes": (path / name).stat().st_size, "sha256": file_sha256(path / name)}
            for name in _share(_files(path))}
    return {name: record for part in _gathered(mine) for name, record in sorted(part.items())}


def _listed_files(path: Path) -> dict[str, dict] | None:
    """The files a COMPLETE this code wrote lists (size and sha256 each); None for any other COMPLETE."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    ours = isinstance(marker, dict) and marker.get("writer") == WRITER and isinstance(marker.get("files"), dict)
    return marker["files"] if ours else None


def written_here(path: Path) -> bool:
    """Whether this code wrote the checkpoint's COMPLETE (and with it the list of files to verify)."""
    return _listed_files(path) is not None


def problems(path: Path, trust: bool = False, collective: bool = True) -> list[str]:
    """What is wrong with a complete checkpoint's files (missing, resized, changed); collective under
    torch.distributed unless told otherwise, each rank hashing its share. A foreign checkpoint is accepted
    unverified only if trusted."""
    from model.manifest import file_problem

    files = _listed_files(path)
    if files is None:
        return [] if trust else [f"its {COMPLETE} was not written by {WRITER} (pass --trust-checkpoint to load it)"]
    mine = ((name, file_problem(path / name, files[name]["sha256"], files[name]["bytes"]))
            for name in _share(sorted(files), collective))
    found = [f"{name} {problem}" for name, problem in mine if problem]
    return sorted(p for part in _gathered(found, collective) for p in part)


def latest_intact(output: str | Path, trust: bool = False, report=print) -> Path | None:
    """The newest complete checkpoint whose files verify; each one that does not is reported and skipped."""
    for path in reversed(complete_checkpoints(output)):
        wrong = problems(path, trust)
        if not wrong:
            return path
        report(f"checkpoint {path} is damaged, skipped: {'; '.join(wrong[:3])}"
               + (f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""))
    return None


def set_aside_after(output: str | Path, step: int) -> list[Path]:
    """Rank 0 moves every step directory newer than `step` to checkpoints/abandoned/: resuming from an older
    step must not be undone by the next `--resume auto`, and nothing is deleted."""
    moved = []
    if not dist.is_initialized() or dist.get_rank() == 0:
        abandoned = checkpoints_dir(output) / ABANDONED
        for path in sorted(checkpoints_dir(output).glob("step-*")):
            if path.is_dir() and path.name > step_tag(step):
                abandoned.mkdir(exist_ok=True)
                target = abandoned / path.name
                serial = 1
                while target.exists():
                    target, serial = abandoned / f"{path.name}.{serial}", serial + 1
                os.replace(path, target)
                moved.append(target)
    if dist.is_initialized():
        dist.barrier()
    return moved


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
