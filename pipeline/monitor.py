"""Watching a training run: rank 0's log lines and records (metrics.jsonl, TensorBoard, W&B), stop signals,
non-finite steps, the watchdog."""

from __future__ import annotations

import faulthandler
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.batch import PackedBatch
from model.sample import TASKS
from pipeline.config import TrainConfig
from pipeline.metrics import BatchCounts, batch_counts, peak_flops, step_figures
from pipeline.run_dir import metrics_file, tensorboard_dir


def log(*parts: object) -> None:
    """Rank 0 prints (every rank before torch.distributed starts)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*parts, flush=True)


class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm's pre-emption warning) on any rank: checkpoint within two steps, on every rank at the
    same step."""

    def __init__(self):
        self.raised = False
        self._flag: torch.Tensor | None = None  # this rank's flag, reduced over ranks in place
        self._host: torch.Tensor | None = None  # the reduced flag in host memory (pinned on a GPU machine)
        self._wait = None  # waits for the reduction started at the previous call
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def any_rank(self, device: torch.device) -> bool:
        """Collective, once per step on every rank: whether any rank was signalled before the previous call.

        Each call reads the reduction the previous call started, then starts the next one, so the host reads a flag
        the device finished a step ago instead of waiting for the device every step. Every rank reads the same
        reduction at the same call, so all of them stop at the same step."""
        stopping = False
        if self._wait is not None:
            self._wait()  # on a GPU, an event the device passed a step ago: no wait in practice
            stopping = bool(self._host.numpy()[0])  # host memory: no device to wait for
        self._start(device)
        return stopping

    def _start(self, device: torch.device) -> None:
        cuda = device.type == "cuda"
        if self._flag is None:
            self._flag = torch.zeros(1, device=device)
            self._host = torch.zeros(1, pin_memory=True) if cuda else self._flag
        self._flag.fill_(float(self.raised))  # a kernel with the value as its argument: no host-to-device copy
        work = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, async_op=True)
        if not cuda:  # gloo reduces into host memory itself
            self._wait = work.wait
            return
        work.wait()  # NCCL: orders the copy after the reduction on the device; the host does not wait
        self._host.copy_(self._flag, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._wait = done.synchronize


class Watchdog:
    """Exit non-zero with every thread's stack if no step completes in `seconds`, so a scheduler requeues."""

    def __init__(self, seconds: float):
        self.seconds, self.last = seconds, time.monotonic()
        if seconds > 0:
            threading.Thread(target=self._watch, daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while True:
            time.sleep(min(30.0, self.seconds / 4))
            if time.monotonic() - self.last > self.seconds:
                print(f"watchdog: no step completed in {self.seconds:.0f}s; stacks follow", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(all_threads=True)
                os._exit(3)


class NonfiniteSteps:
    """Counts non-finite steps in a row (DeepSpeed skips each one itself) and stops the run after too many."""

    def __init__(self, limit: int):
        self.limit, self.in_a_row = limit, 0

    def check(self, step: int, applied: bool, task_loss: torch.Tensor) -> None:
        self.in_a_row = 0 if applied else self.in_a_row + 1
        if self.in_a_row >= self.limit:
            raise FloatingPointError(f"step {step}: {self.in_a_row} non-finite steps in a row; task losses "
                                     f"{dict(zip(TASKS, task_loss.tolist(), strict=True))}")


def wandb_run_id(output: str | Path) -> str:
    """Unique per run directory (its full path), readable by its name: two runs/stage1 elsewhere stay apart."""
    path = Path(output).resolve()
    return f"{path.name}-{hashlib.sha256(str(path).encode()).hexdigest()[:12]}"


class Monitor:
    """Rank 0's record of the run every --log-every steps (and the first and last): a log line,
    metrics.jsonl, TensorBoard event files, and W&B when asked for. Every rank calls `maybe_log` (the figures
    are summed over ranks)."""

    def __init__(self, config: TrainConfig, rank: int, start_step: int):
        self.config, self.start_step, self.active = config, start_step, rank == 0
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter

        output = Path(config.checkpoint.output)
        self.jsonl = open(metrics_file(output), "a")
        self.tensorboard = SummaryWriter(str(tensorboard_dir(output)))
        self.wandb = None
        if config.logging.wandb_project:
            import wandb  # pip install '.[wandb]'

            self.wandb = wandb.init(project=config.logging.wandb_project, dir=str(output), config=config.as_dict(),
                                    resume="allow", id=wandb_run_id(output), name=output.resolve().name)

    def due(self, step: int) -> bool:
        return (step % self.config.logging.log_every == 0 or step == self.config.optim.train_steps
                or step == self.start_step + 1)

    def maybe_log(self, step: int, task_loss: torch.Tensor, lr: float, engine, micro_batches: list[PackedBatch],
                  seconds: float, applied: bool, too_long: dict[str, int]) -> dict | None:
        """On log steps only: reading the losses (and summing the counts over ranks) waits for the device."""
        if not self.due(step):
            return None
        record = step_record(step, task_loss.tolist(), lr, engine, micro_batches, seconds, self.config, applied,
                             too_long)
        log(format_record(record))
        self.record(record)
        return record

    def record(self, record: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        flat = {f"loss/{t}": v for t, v in record["loss"].items()}
        flat.update({k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"})
        flat.update({f"too_long/{t}": n for t, n in record["too_long"].items()})
        for key, value in flat.items():
            self.tensorboard.add_scalar(key, value, record["step"])
        if self.wandb:
            self.wandb.log(flat, step=record["step"])

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            self.tensorboard.close()
            if self.wandb:
                self.wandb.finish()


def step_record(step: int, task_loss: list[float], lr: float, engine, micro_batches: list[PackedBatch],
                seconds: float, config: TrainConfig, applied: bool, too_long: dict[str, int]) -> dict:
    """The log line's figures, all from pipeline/metrics.py, on counts summed over every rank; `too_long`: this
    rank's samples dropped so far for not fitting --seq-len, per task."""
    counts = sum((batch_counts(b) for b in micro_batches), BatchCounts())
    summed = counts.to_tensor().to(engine.device)
    dist.all_reduce(summed)
    dropped = torch.tensor([too_long[t] for t in TASKS], dtype=torch.float64, device=engine.device)
    dist.all_reduce(dropped)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    total = BatchCounts.from_tensor(summed)
    figures = step_figures(total, seconds, dist.get_world_size(), engine.module.config,
                           config.optim.trainable, config.model.gradient_checkpointing, peak_flops(device_name))
    grad_norm = engine.get_global_grad_norm()
    # packing: real / computed tokens (1 for flat micro-batches, by construction); fill: real / the token budget
    budget = dist.get_world_size() * len(micro_batches) * config.data.rows_per_micro_batch * config.data.seq_len
    return {"step": step, "loss": dict(zip(TASKS, task_loss, strict=True)), "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm), "skipped": not applied,
            "step_seconds": seconds, **figures.as_dict(), "budget_fill": total.real_tokens / budget,
            "too_long": {t: int(n) for t, n in zip(TASKS, dropped.tolist(), strict=True)},
            "eta_hours": (config.optim.train_steps - step) * seconds / 3600}


def format_record(r: dict) -> str:
    losses = "  ".join(f"{t} {v:.4f}" for t, v in r["loss"].items())
    norm = "-" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    return (f"step {r['step']:7d}  {losses}  lr {r['lr']:.3e}  grad-norm {norm}  {r['tokens_per_s']:,.0f} tok/s  "
            f"{r['samples_per_s']:.1f} samples/s  MFU {mfu}  packing {r['packing_efficiency']:.1%}  "
            f"fill {r['budget_fill']:.1%}  "
            f"ETA {r['eta_hours']:.1f} h" + ("  SKIPPED (non-finite)" if r["skipped"] else "")
            + ("  too long: " + ", ".join(f"{t} {n}" for t, n in r["too_long"].items() if n)
               if any(r["too_long"].values()) else ""))
