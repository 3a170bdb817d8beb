"""The three-stage Janus-Pro training loop on DeepSpeed ZeRO-3.

    deepspeed launchers/stage1.py --model 7b --data MANIFEST... --init WEIGHTS --output DIR
    janus-train --stage 1 ...    (the same, installed)

`main()` checks everything, sets up the engine, the data path and the resume, then calls `train()`, whose loop
fits one screen. The pieces live in modules of their own, each deciding when it runs: the config
(pipeline/config.py), the checks (preflight.py), set-up (engine.py), the schedule (schedule.py), the loss
(loss.py), logging and stop signals (monitor.py), validation and sample grids (evaluation.py), checkpoints
(checkpoint.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import NoReturn

import deepspeed
import torch
import torch.distributed as dist

from model.batch import PackedBatch
from model.manifest import tokenizer_fingerprint
from model.sample import TASKS
from model.tokenizer import SpecialTokens
from pipeline import checkpoint
from pipeline.config import CheckpointConfig, ConfigError, LoggingConfig, TrainConfig, resolve
from pipeline.data import DataPipeline, TooLong
from pipeline.data.coverage import coverage_extremes, coverage_line, summed_over_ranks
from pipeline.data.reader import shard_problems, shared_prompt_notes
from pipeline.ds_config import BatchPlan
from pipeline.engine import build_engine, run_deepspeed_config, vq_fingerprint
from pipeline.evaluation import Sampler, Validator
from pipeline.loss import step_loss
from pipeline.monitor import (
    Monitor,
    NonfiniteSteps,
    Phases,
    StopFlag,
    Watchdog,
    config_summary,
    log,
    quiet_libraries,
    seconds_since_launch,
)
from pipeline.planning import dry_run, write_run_config
from pipeline.preflight import Checked, manifest_digests, preflight
from pipeline.run_dir import checkpoints_dir, config_file, ds_config_file, fingerprints_file, is_run_directory


def train(config: TrainConfig, *, plan: BatchPlan, engine, data: DataPipeline, start_step: int,
          resumed_from: Path | None, device: torch.device, stop: StopFlag, validator: Validator,
          sampler: Sampler, phases: Phases | None = None, steps_per_epoch: float | None = None) -> int:
    weights = torch.tensor(config.optim.task_loss_weights, dtype=torch.float32, device=device)
    watchdog, batches = Watchdog(config.system.watchdog_seconds), iter(data)
    with phases.phase("first batch") if phases else contextlib.nullcontext():
        batches = itertools.chain([next(batches)], batches)
    monitor = Monitor(config, dist.get_rank(), start_step, steps_per_epoch=steps_per_epoch)
    nonfinite = NonfiniteSteps(config.optim.max_nonfinite_steps)
    step, last_step = start_step, config.optim.train_steps
    while step < last_step:
        started, lr = time.perf_counter(), engine.get_lr()[0]  # the rate this step uses
        micro_batches = [next(batches).to(device) for _ in range(plan.accumulation_steps)]
        waited = time.perf_counter() - started  # for the data path: what the step spent waiting for it
        loss_sums, step_counts, applied = optimizer_step(engine, micro_batches, weights,
                                                         config.optim.loss_normalisation)
        step += 1
        watchdog.beat()
        task_loss = loss_sums / step_counts.clamp(min=1)  # left on the device: read on log steps only
        nonfinite.check(step, applied, task_loss)
        monitor.maybe_log(step, task_loss, lr, engine, micro_batches, time.perf_counter() - started, applied,
                          data.too_long, targets=step_counts, data_wait=waited)
        if monitor.due(step):  # collective: every rank's counts summed
            log(coverage_line(coverage_extremes(summed_over_ranks(data.coverage, device))))
        validator.maybe_run(engine, step)
        sampler.maybe_run(engine, step)
        stopping = stop.any_rank(device)
        if stopping or checkpoint.due(step, config.checkpoint.save_every, last_step):
            coverage = data.coverage_summary(summed_over_ranks(data.coverage, device))  # collective
            path = checkpoint.save(engine, config.checkpoint.output, step, {"data": data.state_dict()},
                                   config.checkpoint.keep_last, keep=resumed_from, coverage=coverage)
            monitor.checkpointed(path)
        if stopping:
            log(f"stop signal: checkpointed step {step}, exiting")
            break
    monitor.close()
    return step


def optimizer_step(engine, micro_batches: list[PackedBatch], weights: torch.Tensor,
                   normalisation: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches: (loss sums per task, target counts, applied), global.

    A step whose global gradient norm is not finite is not applied: DeepSpeed's ZeRO-3 optimizer then skips
    the update, Adam's moments and step count included, and clears the gradients, on every rank alike.

    Nothing here waits for the device (under NCCL the collectives are queued on it); `engine.step()` does, once
    per step: DeepSpeed reads whether the global gradient norm is finite (`is_invalid_grad_norm`), which that
    skip needs. torch's AdamW reads its step count too, a tensor kept on the host. tests/*/test_host_syncs.py
    records whose each wait is (on a GPU with the driver's sync debug mode too: bench/gpu_check.sh).
    """
    device, world = weights.device, dist.get_world_size()
    # The whole step's target count, on every rank, before the first backward.
    step_counts = torch.stack([b.target_count for b in micro_batches]).sum(0).to(device, torch.float32)
    dist.all_reduce(step_counts)
    loss_sums = torch.zeros(len(TASKS), device=device)
    for batch in micro_batches:
        out = engine(batch)
        # DeepSpeed divides by the accumulation steps and averages over ranks: undo both.
        engine.backward(step_loss(out.loss_sum, step_counts, weights, normalisation) * len(micro_batches) * world)
        engine.step()
        loss_sums += out.loss_sum.detach().float()
    dist.all_reduce(loss_sums)
    return loss_sums, step_counts, engine.was_step_applied()


# Faults found mid-run that only a person can fix (free disk space; raise --seq-len; lower the learning rate or
# fix the data): the run replayed from its checkpoint would meet them again.
NEEDS_A_PERSON = (checkpoint.CheckpointNotWritten, TooLong, FloatingPointError)


def main(stage: int | None, argv: list[str] | None = None) -> None:
    """`stage`: the launcher's (launchers/stageN.py), or None to take --stage."""
    imports, checking = seconds_since_launch(), time.monotonic()
    stop = StopFlag()  # first: a pre-emption signal during start-up must not kill the rank
    quiet_libraries()
    # The run's own logging settings apply once it is set up (run_stage); until then, their defaults.
    phases = Phases(LoggingConfig.heartbeat_seconds)
    try:
        config, args = resolve(stage, argv)
        if args.dry_run:
            return print(dry_run(config, args.cluster, args.model_config))
        if args.write_ds_config:
            return print(write_run_config(config, args))
        if imports is not None:
            phases.ended("imports", imports)
        with phases.phase("checks", started=checking):
            checked = preflight(config, world_size=launcher_world_size())
            device = bind_device()  # before the first collective: NCCL's communicator is made on the current device
    except ConfigError as error:  # a user's mistake: one line, no traceback
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    # Every collective of the run's default group waits at most the run's collective timeout (DeepSpeed's default
    # would be 10 minutes).
    with phases.phase("rendezvous"):
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                                   timeout=timedelta(seconds=config.system.collective_timeout_seconds))
    try:
        run_stage(config, args, checked, device, stop, phases)
    except Exception:  # noqa: BLE001 - whatever it is, this rank must not outlive it
        # A rank that raised and then waited in the interpreter's teardown (threads still running, the process
        # group alive) would leave its peers in their next collective until the collective timeout: a fault seen
        # as a hang. Ending the process now closes its connections, so the peers' collectives fail at once.
        # Each line prefixed with the rank, as torch's own hook prints an uncaught error of a distributed rank.
        print("".join(f"[rank{dist.get_rank()}]: {line}\n" for line in traceback.format_exc().splitlines()),
              file=sys.stderr, end="", flush=True)
        exit_now(1)


def run_stage(config: TrainConfig, args: argparse.Namespace, checked: Checked, device: torch.device,
              stop: StopFlag, phases: Phases) -> None:
    """Everything a rank does once torch.distributed is up: set-up, resume, training."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(config.data.seed)
    quiet_libraries(config.logging.deepspeed_log_level)
    phases.heartbeat = config.logging.heartbeat_seconds

    tokenizer, plan = checked.tokenizer, checked.plan
    special = SpecialTokens.from_tokenizer(tokenizer)
    ds = run_deepspeed_config(config, plan, args.model_config)
    output = Path(config.checkpoint.output)
    if rank == 0:
        output.mkdir(parents=True, exist_ok=True)
        config.save(config_file(output))
        ds_config_file(output).write_text(json.dumps(ds, indent=2))
        plan_line = f"{plan.accumulation_steps} micro-batch(es) of {plan.rows_per_micro_batch} row(s) per step"
        print("\n".join(config_summary(config, args.model_config, world, plan_line)), flush=True)
        print("".join(f"{note}\n" for note in shared_prompt_notes(config.data.data)), end="", flush=True)
        if args.epoch:
            print(args.epoch.line(), flush=True)
    with phases.phase("shard hashing"):
        check_shards_once(config.data.data + config.data.val_data)
    with phases.phase("checkpoint checks"):
        resume_from = intact_checkpoints(config.model.init, config.checkpoint)
    with phases.phase("engine build"):
        try:
            loading = checkpoint.loading_config(ds, resume_from)
        except ConfigError as error:
            refuse(str(error))
        try:
            engine = build_engine(config, loading, args.model_config, special.image_placeholder)
        except checkpoint.UnsafeCheckpoint as error:  # --init's checkpoint holds more than data
            refuse(f"--init {config.model.init}: {error}")
        fingerprints = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                        "vq_fingerprint": vq_fingerprint(engine.module)}

    pipeline_options = {**fingerprints, "verified": True}  # every data pipeline's: shards checked at start
    if rank == 0:
        fingerprints_file(output).write_text(json.dumps({**fingerprints, "manifests": manifest_digests(
            config.data.data)}, indent=1) + "\n")
    with phases.phase("resume"):
        data = DataPipeline(config.data, special, rank, world, **pipeline_options)
        try:
            start_step = resume(config, engine, data, resume_from)
        except checkpoint.UnsafeCheckpoint as error:  # the checkpoint holds more than data
            refuse(f"--resume {config.checkpoint.resume}: {error}")
    validator = Validator(config.data, config.logging, special, device, **pipeline_options)
    sampler = Sampler(config.logging, config.checkpoint.output, tokenizer, val_data=config.data.val_data)
    try:
        step = train(config, plan=plan, engine=engine, data=data, start_step=start_step, resumed_from=resume_from,
                     device=device, stop=stop, validator=validator, sampler=sampler, phases=phases,
                     steps_per_epoch=args.epoch.steps if args.epoch else None)
    except NEEDS_A_PERSON as error:  # a requeue would fail the same way: exit 2, which Slurm does not requeue
        print(f"error: {error}", file=sys.stderr, flush=True)  # every rank: each one's log says why it stopped
        exit_needing_a_person()
    log(f"done at step {step}; checkpoints in {checkpoints_dir(output)}")
    dist.barrier()
    dist.destroy_process_group()


def bind_device() -> torch.device:
    """This rank's device, made current before any collective (an NCCL communicator, and every later CUDA call, uses
    the current device: unset, every rank of a node would land on cuda:0).

    cuda:LOCAL_RANK where the node's GPUs are all visible to each rank (the deepspeed launcher, torchrun, srun
    without GPU binding); cuda:0 where each rank sees exactly one (Slurm's --gpus-per-task / --gpu-bind, or
    CUDA_VISIBLE_DEVICES set per task). Then LOCAL_RANK is set to 0 too, because DeepSpeed's zero.Init and engine
    bind cuda:LOCAL_RANK themselves. The CPU without CUDA."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local, visible = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
    if local < visible:
        index = local
    elif visible == 1:
        index = 0
        os.environ["LOCAL_RANK"] = "0"
    else:
        raise ConfigError(f"LOCAL_RANK {local} but this rank sees {visible} GPUs (cuda:0-{visible - 1}): give each "
                          f"rank either every GPU of its node or exactly one (CUDA_VISIBLE_DEVICES, Slurm's GPU "
                          f"binding)")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def check_shards_once(manifests: list[str]) -> None:
    """Collective: every shard's sha256 against its manifest, each shard hashed by one rank for the whole job (not
    by every rank that reads it); a bad one stops every rank before the model is built."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, shard_problems(manifests, dist.get_rank(), dist.get_world_size()))
    problems = sorted(p for part in parts for p in part)
    if problems:
        refuse(f"{len(problems)} shard(s) do not match their manifests: {'; '.join(problems[:5])}; rerun "
             "preprocessing into their directories to rewrite them")


def intact_checkpoints(init: str | None, saving: CheckpointConfig) -> Path | None:
    """Collective, before the model is built: --init's checkpoint (a previous stage's run) verifies, and the
    checkpoint to resume from is the newest intact one (`--resume auto`, damaged ones reported and skipped) or
    the one named, verified. Each rank hashes its share of the files."""
    if init and is_run_directory(init):
        source = checkpoint.latest_checkpoint(init)
        damaged = checkpoint.problems(source, saving.trust_checkpoint)
        if damaged:
            refuse(f"--init {init}: its checkpoint {source.name} is damaged: {'; '.join(damaged[:3])}")
    if saving.resume == "auto":
        return checkpoint.latest_intact(saving.output, saving.trust_checkpoint, report=log)
    if saving.resume == "none":
        return None
    damaged = checkpoint.problems(Path(saving.resume), saving.trust_checkpoint)
    if damaged:
        refuse(f"--resume {saving.resume}: the checkpoint is damaged: {'; '.join(damaged[:3])}")
    return Path(saving.resume)


def refuse(message: str) -> NoReturn:
    """A fault in the inputs found once the ranks are up: rank 0 says it in one line, every rank exits 2 (a
    scheduler must not requeue it)."""
    log(f"error: {message}")
    exit_needing_a_person()


def exit_needing_a_person() -> NoReturn:
    """Exit 2 now, which a scheduler must not requeue."""
    exit_now(2)


def exit_now(status: int) -> NoReturn:
    """Exit now, not through the interpreter's teardown: with the process group still up, a C++ thread destroyed
    unjoined there can abort the process (std::terminate, exit -6, seen on 2 CPU ranks under load), which reads as
    a crash to requeue. metrics.jsonl is flushed at every write; TensorBoard's last buffered events can be lost."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def resume(config: TrainConfig, engine, data: DataPipeline, path: Path | None) -> int:
    """The step to start from (0 for a fresh run), with the engine and the data path restored from `path`.
    Checkpoints newer than that step are set aside, so the next `--resume auto` does not undo a rollback.

    On another number of ranks than wrote `path` (a node lost, or added), DeepSpeed loads the checkpoint through
    its universal form and the data path continues from every old rank's position: no sample of an epoch is
    repeated or skipped (DataPipeline.continue_from). The batch plan was already derived for this world size."""
    step = 0
    if path is not None:
        state = checkpoint.load(engine, path)
        if state["world_size"] == dist.get_world_size():
            data.load_state_dict(state["data"])
        else:
            data.continue_from([s["data"] for s in checkpoint.rank_states(path)])
            log(f"resuming a checkpoint of {state['world_size']} ranks on {dist.get_world_size()}")
        step = state["step"]
        log(f"resumed from {path} at step {step}")
    for moved in checkpoint.set_aside_after(config.checkpoint.output, step):
        log(f"set aside {moved} (newer than the step this run starts from)")
    return step


def launcher_world_size() -> int:
    """The world size a launcher set (deepspeed, torchrun, srun with our sbatch scripts). Without one (a plain
    `python launchers/stage1.py`), one rank on this machine: DeepSpeed would otherwise look for MPI."""
    if "RANK" not in os.environ and not any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ.get("PMI_SIZE"))


def cli(argv: list[str] | None = None) -> None:
    """`janus-train --stage N [flags]`: the stage launchers as one installed command (the stage may also come from
    the --config file's `stage:`)."""
    main(None, argv)


if __name__ == "__main__":  # `python -m pipeline.train --stage N ...`, as janus-train
    cli()
