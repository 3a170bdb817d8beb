"""Watching a training run: rank 0's records (metrics.jsonl, TensorBoard, W&B), stop signals, the watchdog."""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist

from pipeline.train_config import TrainConfig


class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm's pre-emption warning) on any rank: checkpoint at the next step boundary."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def any_rank(self, device: torch.device) -> bool:
        flag = torch.tensor([float(self.raised)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


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


class Monitor:
    """Rank 0's record of the run: metrics.jsonl, TensorBoard event files, and W&B when asked for."""

    def __init__(self, config: TrainConfig, rank: int):
        self.active = rank == 0
        if not self.active:
            return
        from torch.utils.tensorboard import SummaryWriter

        output = Path(config.output)
        self.jsonl = open(output / "metrics.jsonl", "a")
        self.tensorboard = SummaryWriter(str(output / "tensorboard"))
        self.wandb = None
        if config.wandb_project:
            import wandb  # pip install -e '.[wandb]'

            self.wandb = wandb.init(project=config.wandb_project, dir=str(output), config=vars(config),
                                    resume="allow", id=output.resolve().name)

    def record(self, record: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        flat = {f"loss/{t}": v for t, v in record["loss"].items()}
        flat.update({k: v for k, v in record.items() if isinstance(v, int | float) and k != "step"})
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


