"""Checkpoints that are complete and intact or ignored, resume as the default path, and stage hand-off.

Layout: OUTPUT/checkpoints/step-00001000/ holds DeepSpeed's files (every rank's ZeRO shards), one
`rank-{r}.pt` per rank (data-path state, RNG states) and, last, `COMPLETE`. DeepSpeed's own `latest`
is never written: its rank 0 writes it before the other ranks finish their shards, so a crash then
leaves it pointing at a torn checkpoint. Here a re-save first removes the step's old `COMPLETE`, every
rank saves, all meet at a barrier, the files are hashed (each rank hashes its share), and only then rank 0
writes `COMPLETE` (an atomic rename) listing every file with its size and sha256, and prunes old checkpoints.
A write that fails on any rank (a full disk) fails the save on every rank alike, naming the rank and the free
space, and the partial step directory is removed.

Resume takes the newest checkpoint whose files all match its `COMPLETE` (a flipped bit or a truncated file is
reported by name and skipped). Resuming from an older step sets newer ones aside in `checkpoints/abandoned/`:
a checkpoint is never deleted except by pruning, which keeps the step a run resumed from.

Trust: DeepSpeed pickles its checkpoint files, and every load of them here (resume, --init, universal conversion,
export) goes through torch's weights-only unpickler (pipeline/safe_load.py), so a file that carries code is refused,
whoever wrote it. Only a checkpoint whose `COMPLETE` this code wrote, listing every file, is verified and loaded;
one without that list (a foreign or hand-made checkpoint) only with `--trust-checkpoint`, unverified.

Resuming on another number of ranks loads DeepSpeed's state through its universal checkpoint, converted once
into the step directory's `universal/` (with its own COMPLETE) and pruned with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from model.lora import LoraSettings, is_adapter, merged_state
from pipeline.config import TrainConfig
from pipeline.data.coverage import write_coverage
from pipeline.run_dir import checkpoints_dir, config_file, consolidated_dir, coverage_file
from pipeline.safe_load import UnsafeCheckpoint, weights_only_loads

COMPLETE = "COMPLETE"
WRITER = "janus-pipeline"  # in every COMPLETE this code writes
ABANDONED = "abandoned"
UNIVERSAL = "universal"  # inside a step directory: its DeepSpeed files converted for another number of ranks
LATEST_UNIVERSAL = "latest_universal"  # what DeepSpeed's conversion writes beside its output (removed, never read)
CONVERSION_TIMEOUT = timedelta(hours=3)  # ~84 GB read and written at 7B by one rank


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


def save(engine, output: str | Path, step: int, rank_state: dict, keep_last: int, keep: Path | None = None,
         coverage: dict | None = None) -> Path:
    """Collective: every rank writes its part; the checkpoint counts only once all have and every file is listed
    in its COMPLETE. Pruning keeps the `keep_last` newest and `keep` (the checkpoint the run resumed from)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    tag = step_tag(step)
    path = checkpoints_dir(output) / tag
    if rank == 0 and (path / COMPLETE).exists():
        (path / COMPLETE).unlink()  # a re-save: the old marker must not vouch for a mix of new and old files
    dist.barrier()
    failed = _failure(lambda: engine.save_checkpoint(str(checkpoints_dir(output)), tag=tag,
                                                     client_state={"step": step}, save_latest=False))
    if failed:
        _after_a_failed_save(engine)
    state = {**rank_state, "step": step, "world_size": world, "rng": rng_state()}
    failed = failed or _failure(lambda: _write_atomically(path / f"rank-{rank}.pt", lambda f: torch.save(state, f)))
    if rank == 0 and coverage is not None:  # before COMPLETE lists the files: an unlisted file fails verification
        failed = failed or _failure(lambda: write_coverage(coverage_file(path), coverage))
    _all_written(path, failed)
    files = file_records(path)
    failed = ""
    if rank == 0:
        marker = json.dumps({"writer": WRITER, "step": step, "world_size": world, "files": files}) + "\n"
        failed = _failure(lambda: _write_atomically(path / COMPLETE, lambda f: f.write_text(marker)))
        if not failed:
            for old in complete_checkpoints(output)[:-keep_last] if keep_last > 0 else []:
                if keep is None or old.resolve() != keep.resolve():
                    shutil.rmtree(old, ignore_errors=True)
            for torn in checkpoints_dir(output).glob("step-*"):  # older, never completed
                if not (torn / COMPLETE).exists() and torn.name < tag:
                    shutil.rmtree(torn, ignore_errors=True)
    _all_written(path, failed)
    return path


class CheckpointNotWritten(OSError):
    """A save that failed on some rank (a full disk, a quota), raised on every rank alike."""


def _failure(write) -> str:
    """'' once `write()` has run; otherwise what went wrong, for every rank to hear (a rank that raised alone would
    leave the others in a collective: on NCCL until the collective timeout)."""
    try:
        write()
        return ""
    except Exception as error:  # noqa: BLE001 - whatever it is, the other ranks must stop too
        traceback.print_exc()
        return f"rank {dist.get_rank()}: {type(error).__name__}: {error}"


def _after_a_failed_save(engine) -> None:
    """The collectives DeepSpeed's save_checkpoint runs after its writes, which its raise skipped on this rank only:
    ZeRO-3's epilogue re-gathers the persistent parameters (an all-gather), then a barrier. Without them, a rank
    whose write succeeded waits in that all-gather while this one waits in the barrier, both until the collective
    timeout (seen with deepspeed 0.19.8: a full disk failing one rank's model-states file)."""
    optimizer = engine.optimizer
    if optimizer is not None and hasattr(optimizer, "checkpoint_event_epilogue"):
        optimizer.checkpoint_event_epilogue()
    dist.barrier()


def _write_atomically(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    write(tmp)
    os.replace(tmp, target)


def _free_space(path: Path) -> str:
    try:
        fs = os.statvfs(path)
    except OSError as error:
        return f"free space unknown: {error}"
    return f"{fs.f_bavail * fs.f_frsize:,} bytes and {fs.f_favail:,} inodes free"


def _all_written(path: Path, failed: str) -> None:
    """Collective: returns once every rank has written its part. Otherwise every rank raises the same error naming
    the ranks and the free space (torch.save on a full disk says only "iostream error"), after rank 0 removed the
    partial step directory: its files hold the space a full disk needs back, and would never count."""
    parts = _gathered([failed, _free_space(path.parent)])
    failures = [part[0] for part in parts if part[0]]
    if not failures:
        return
    if dist.get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)
    raise CheckpointNotWritten(
        f"checkpoint {path} was not written ({parts[0][1]} on its file system; its partial files were removed): "
        f"{'; '.join(failures)}. Free space, then resume: --resume auto takes the newest complete checkpoint")


def _collective(collective: bool) -> bool:
    return collective and dist.is_initialized()


def _share(items: list[str], collective: bool = True) -> list[str]:
    """This rank's share of a list every rank holds alike (all of it when one process does the work)."""
    if not _collective(collective):
        return items
    return items[dist.get_rank()::dist.get_world_size()]


def _gathered(part: dict | list | str, collective: bool = True, group: dist.ProcessGroup | None = None) -> list:
    if not _collective(collective):
        return [part]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part, group=group)
    return parts


def _files(path: Path) -> list[str]:
    return sorted(str(f.relative_to(path)) for f in path.rglob("*")
                  if f.is_file() and f.name != COMPLETE and not f.name.startswith("."))


def _unlisted(path: Path, files: dict[str, dict]) -> list[str]:
    """Files in a checkpoint that its COMPLETE does not list: DeepSpeed opens its files by pattern, so one added
    later would be loaded unverified. The universal conversion inside a step directory has its own COMPLETE."""
    return [name for name in _files(path) if name not in files and not name.startswith(f"{UNIVERSAL}/")
            and name != LATEST_UNIVERSAL]


def file_records(path: Path) -> dict[str, dict]:
    """Every file of a checkpoint with its size and sha256; collective, each rank hashing its share once."""
    from model.manifest import file_sha256

    mine = {name: {"bytes": (path / name).stat().st_size, "sha256": file_sha256(path / name)}
            for name in _share(_files(path))}
    return {name: record for part in _gathered(mine) for name, record in sorted(part.items())}


def _listed_files(path: Path) -> dict[str, dict] | None:
    """The files a COMPLETE this code wrote lists (size and sha256 each); None for any other COMPLETE, and for one
    that lists no files: it would vouch for whatever lies beside it (this code never writes an empty checkpoint)."""
    try:
        marker = json.loads((path / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    files = marker.get("files") if isinstance(marker, dict) and marker.get("writer") == WRITER else None
    listed = isinstance(files, dict) and files and all(
        isinstance(r, dict) and isinstance(r.get("sha256"), str) and isinstance(r.get("bytes"), int)
        for r in files.values())
    return files if listed else None


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
        return [] if trust else [f"its {COMPLETE} was not written by {WRITER} or lists no files (pass "
                                 "--trust-checkpoint to load it unverified)"]
    mine = ((name, file_problem(path / name, files[name]["sha256"], files[name]["bytes"]))
            for name in _share(sorted(files), collective))
    found = [f"{name} {problem}" for name, problem in mine if problem]
    if not _collective(collective) or dist.get_rank() == 0:
        found += [f"{name} is not listed in its {COMPLETE}" for name in _unlisted(path, files)]
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


def saved_world_size(path: Path) -> int:
    """How many ranks wrote a complete checkpoint."""
    return json.loads((path / COMPLETE).read_text())["world_size"]


def resized(path: Path | None) -> bool:
    """Whether resuming from `path` changes the number of ranks (DeepSpeed then loads a universal checkpoint)."""
    return path is not None and saved_world_size(path) != dist.get_world_size()


def loading_config(ds: dict, path: Path | None) -> dict:
    """The run's DeepSpeed config, told to load a universal checkpoint when `path` was written by another number
    of ranks (the key is read only when loading, but only from the config the engine was built with)."""
    if not resized(path):
        return ds
    stage, saved = ds.get("zero_optimization", {}).get("stage"), saved_world_size(path)
    if stage != 3:
        from pipeline.config import ConfigError

        # Seen with deepspeed 0.19.8: a 2-rank ZeRO-2 checkpoint, converted with inject_missing_state (its files lack
        # universal_checkpoint_info), loads on 1 rank without an error, but the next step's loss is off by 0.04
        # (ZeRO-3's is bit-identical): refused rather than trained on wrong.
        raise ConfigError(f"{path} was written by {saved} ranks and this run uses ZeRO-{stage}: resume it on {saved} "
                          "ranks (only under ZeRO-3 does a checkpoint resume on another number)")
    return {**ds, "checkpoint": {**ds.get("checkpoint", {}), "load_universal": True}}


def load(engine, path: Path) -> dict:
    """Restore DeepSpeed's state and this rank's RNG; return this rank's saved state (data path, RNG, step, world
    size). On another number of ranks than wrote `path`, DeepSpeed's state comes from its universal checkpoint
    (converted once, `universal`) and rank r gets saved rank r % (old world size)'s state: its data path must
    then continue from every saved rank's (`rank_states`)."""
    rank = dist.get_rank()
    if resized(path):
        if not engine.load_universal_checkpoint():
            raise ValueError(f"{path} was written by {saved_world_size(path)} ranks: build the engine with "
                             "loading_config() so that DeepSpeed loads it as a universal checkpoint")
        converted = universal(path)
        with weights_only_loads(converted):  # ZeRO-3's universal load calls torch.load itself
            engine.load_checkpoint(str(path), tag=converted.name)
    else:
        with weights_only_loads(path):
            engine.load_checkpoint(str(path.parent), tag=path.name)
    state = rank_states(path, [rank % saved_world_size(path)])[0]
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["rng"]["cuda"])
    return state


def rank_states(path: Path, ranks: list[int] | None = None) -> list[dict]:
    """The states the ranks that wrote `path` saved beside DeepSpeed's (all of them, in rank order, by default)."""
    ranks = range(saved_world_size(path)) if ranks is None else ranks
    # Our own files, written by this code: tensors and plain containers only.
    return [torch.load(path / f"rank-{r}.pt", weights_only=True) for r in ranks]


def universal(path: Path) -> Path:
    """Collective: the checkpoint's DeepSpeed files as DeepSpeed's universal checkpoint, in path/universal.

    Rank 0 converts (DeepSpeed's ds_to_universal) while the others wait; the folder counts only once its own
    COMPLETE, written last and listing every file's size and sha256, verifies. A conversion cut short, or
    damaged since, is redone, never loaded. The folder lives and is pruned with its checkpoint.
    """
    out = path / UNIVERSAL
    ready = (out / COMPLETE).is_file() and not problems(out)
    dist.barrier()  # every rank has looked before rank 0 replaces it
    if not ready:
        # The others wait on a group of their own: at 7B the conversion takes longer than the run's collective
        # timeout allows a rank to wait, and it is not a hang.
        waiting = dist.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT)
        failed, unsafe = "", False
        if dist.get_rank() == 0:
            print(f"converting {path} to DeepSpeed's universal checkpoint in {out}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
            try:
                convert_to_universal(path, out)
            except UnsafeCheckpoint as error:  # a refusal, said in one line: no stack
                failed, unsafe = str(error), True
            except Exception as error:  # noqa: BLE001 - the waiting ranks must hear it, not sit out the timeout
                traceback.print_exc()
                failed = f"{type(error).__name__}: {error}"
        failures = [f for f in _gathered([failed, unsafe], group=waiting) if f[0]]
        if failures and failures[0][1]:
            raise UnsafeCheckpoint(failures[0][0])
        if failures:
            raise RuntimeError(f"converting {path} to a universal checkpoint failed on rank 0: {failures[0][0]}")
        files = file_records(out)
        if dist.get_rank() == 0:
            marker = json.dumps({"writer": WRITER, "from": path.name, "files": files}) + "\n"
            _write_atomically(out / COMPLETE, lambda f: f.write_text(marker))
        dist.barrier()
    return out


def convert_to_universal(source: Path, out: Path) -> None:
    """DeepSpeed's own ZeRO-to-universal conversion, in this process (its worker pools would fork a process that
    holds the process group's threads)."""
    from deepspeed.checkpoint import ds_to_universal

    with weights_only_loads(source):  # it calls torch.load itself, a dozen times
        ds_to_universal.main(argparse.Namespace(input_folder=str(source), output_folder=str(out),
                                                num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                                strict=True, inject_missing_state=False))
    # It also writes `latest_universal` beside its output; this code always names the folder it loads.
    (out.parent / LATEST_UNIVERSAL).unlink(missing_ok=True)


def consolidate(run_dir: str | Path) -> Path:
    """A previous stage's latest complete checkpoint as a transformers-layout safetensors directory (a LoRA run's
    adapters merged into their layers).

    Uses DeepSpeed's own ZeRO consolidation (frozen parameters included: they are saved by default) and
    checks it got every parameter. Rank 0 does the work once; the others wait and reuse it. Kept beside the run
    and reused only while made from the very checkpoint now at that step (the sha256 of its COMPLETE): a step
    saved again since (a rollback, `--resume none` into the same output) is consolidated again.
    Collective when torch.distributed is up: a failure on rank 0 (a refused file) is raised on every rank.
    """
    from model.manifest import file_sha256

    source = latest_checkpoint(run_dir)
    if source is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to start from")
    out = consolidated_dir(run_dir, source.name)
    made_from = file_sha256(source / COMPLETE)
    settings = lora_settings(run_dir)
    failed, unsafe = "", False
    if not _collective(True) or dist.get_rank() == 0:
        try:
            if _consolidated_from(out) != made_from:
                _write_consolidated(source, out, made_from, settings)
        except UnsafeCheckpoint as error:
            failed, unsafe = str(error), True
        except Exception as error:  # noqa: BLE001 - the waiting ranks must hear it, not sit out the timeout
            traceback.print_exc()
            failed = f"{type(error).__name__}: {error}"
    group = dist.new_group(backend="gloo", timeout=CONVERSION_TIMEOUT) if _collective(True) else None
    failures = [f for f in _gathered([failed, unsafe], group=group) if f[0]]  # at 7B, longer than a collective
    if failures and failures[0][1]:
        raise UnsafeCheckpoint(failures[0][0])
    if failures:
        raise RuntimeError(f"consolidating {source} for --init failed on rank 0: {failures[0][0]}")
    return out


def _consolidated_from(out: Path) -> str | None:
    """The sha256 of the COMPLETE of the checkpoint `out` was consolidated from; None if unknown or unfinished."""
    try:
        marker = json.loads((out / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return marker.get("complete_sha256") if isinstance(marker, dict) else None


def _write_consolidated(source: Path, out: Path, made_from: str, lora: LoraSettings | None) -> None:
    from safetensors.torch import save_file

    state = plain_state(source, lora)
    shutil.rmtree(out, ignore_errors=True)  # RUN/consolidated/step-N: this code's own, stale or unfinished
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"))
    marker = {"from": str(source), "complete_sha256": made_from, "tensors": len(state)}
    _write_atomically(out / COMPLETE, lambda f: f.write_text(json.dumps(marker) + "\n"))  # last


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


def lora_settings(run_dir: str | Path) -> LoraSettings | None:
    """The LoRA adapters a run trained (its config.yaml's `lora`), or None: a run without, or from before LoRA."""
    return TrainConfig.load(config_file(run_dir)).lora.settings() if config_file(run_dir).is_file() else None


def plain_state(source: Path, lora: LoraSettings | None) -> dict[str, torch.Tensor]:
    """`consolidated_state` under transformers' plain names: a LoRA run's adapters folded into their layers
    (model/lora.py), so the next stage's --init and an export load it as any other run's."""
    state = consolidated_state(source)
    if lora is None:
        if any(is_adapter(name) for name in state):
            raise ValueError(f"{source} holds LoRA adapters but its run's config.yaml has no LoRA settings")
        return state
    return merged_state(state, lora)


def consolidated_state(source: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of one complete ZeRO checkpoint (any world size), in one process, loaded as data
    (a file that carries code raises UnsafeCheckpoint).

    DeepSpeed's own zero_to_fp32 merges every rank's shards without torch.distributed; frozen parameters are
    included because engine.save_checkpoint saves them by default (exclude_frozen_parameters=False), which a
    caller still checks against the model's key set.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if not (source / COMPLETE).is_file():
        raise FileNotFoundError(f"{source} is not a complete checkpoint (no {COMPLETE} marker)")
    with weights_only_loads(source):  # zero_to_fp32 calls torch.load itself
        state = get_fp32_state_dict_from_zero_checkpoint(str(source.parent), tag=source.name)
    # zero_to_fp32 may return views into a flat buffer: give each tensor its own storage for safetensors.
    return {k: v.detach().clone().contiguous() for k, v in state.items()}
