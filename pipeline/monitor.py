"""Watching a training run: rank 0's log lines and records (metrics.jsonl, TensorBoard, W&B), start-up phases and
their heartbeat, stop signals, non-finite steps, the watchdog, and the library noise kept out of the log."""

from __future__ import annotations

import dataclasses
import faulthandler
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from model.batch import PackedBatch
from model.config import model_size
from model.sample import TASKS
from model.stages import stage_for
from pipeline.attention import default_attention
from pipeline.config import SECTIONS, TrainConfig, flag, table2
from pipeline.data.coverage import SHORT
from pipeline.metrics import BatchCounts, batch_counts, peak_flops, step_figures
from pipeline.run_dir import config_file, metrics_file, tensorboard_dir


def launch_rank() -> int:
    """This process's rank as its launcher set it (deepspeed, torchrun, srun, MPI): known before torch.distributed
    starts; 0 for a plain one-process run."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


def is_rank_zero() -> bool:
    return dist.get_rank() == 0 if dist.is_initialized() else launch_rank() == 0


def log(*parts: object) -> None:
    """Rank 0 prints (before torch.distributed starts: the rank its launcher gave it)."""
    if is_rank_zero():
        print(*parts, flush=True)


def duration(seconds: float) -> str:
    """A span as a person reads it at a glance: 4.2s, 42s, 12m05s, 3h05m, 2d04h."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# ---- library noise, filtered where it starts ----

# (message regex, category, module) of warnings that libraries raise about their own calls, which a user can do
# nothing about: DeepSpeed's ZeRO-3 calls torch's deprecated collectives in every micro-batch.
LIBRARY_WARNINGS = (
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning,
     r"torch\.distributed\.c10d_logger"),
)


class WarningsOnce:
    """`warnings.showwarning` that shows each distinct warning (category, text, place) once per run, on rank 0 only.

    Python's own once-per-place record does not hold over a run: every `warnings.catch_warnings()` anyone enters
    clears it, and torch enters one in helpers it calls per op (torch.overrides), so a warning raised in every
    micro-batch is printed in every micro-batch."""

    def __init__(self, show: bool, to: Callable | None = None):
        self.show, self.to, self.seen = show, to or warnings.showwarning, set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        key = (category, str(message), filename, lineno)
        if not self.show or key in self.seen:
            return
        self.seen.add(key)
        self.to(message, category, filename, lineno, file, line)


class LogRecordsOnce(logging.Filter):
    """The same rule for a library's `logging` records below ERROR: once per text, on rank 0 only."""

    def __init__(self, show: bool):
        super().__init__()
        self.show, self.seen = show, set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        key = (record.name, record.levelno, record.getMessage())
        if not self.show or key in self.seen:
            return False
        self.seen.add(key)
        return True


def quiet_libraries(deepspeed_level: str = "warning") -> None:
    """Every distinct warning at most once per run and only on rank 0; DeepSpeed's own logger from
    `deepspeed_level` up (its INFO is a report per start-up and per `steps_per_print`). Call once, early."""
    for message, category, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    show = launch_rank() == 0
    if not isinstance(warnings.showwarning, WarningsOnce):
        warnings.showwarning = WarningsOnce(show)
    level = getattr(logging, deepspeed_level.upper())
    for name in ("DeepSpeed", "transformers"):
        logger = logging.getLogger(name)
        if name == "DeepSpeed":
            logger.setLevel(level)
        for handler in logger.handlers:
            if name == "DeepSpeed":
                handler.setLevel(level)  # DeepSpeed gives its handler a level of its own
            if not any(isinstance(f, LogRecordsOnce) for f in handler.filters):
                handler.addFilter(LogRecordsOnce(show))


# ---- start-up: phases, their times, a heartbeat ----

def seconds_since_launch() -> float | None:
    """Wall seconds since this process started, interpreter start-up and imports included (Linux's /proc); None
    where unknown."""
    try:
        fields_after_name = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields_after_name[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks
        return float(Path("/proc/uptime").read_text().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Start-up phases on rank 0: a line with each one's time as it ends and, while one runs longer than
    `heartbeat` seconds, a line every `heartbeat` seconds naming it (0: none), so a slow start is never silent."""

    def __init__(self, heartbeat: float, say: Callable[[str], None] = log):
        self.heartbeat, self.say = heartbeat, say
        self.launched = time.monotonic() - (seconds_since_launch() or 0.0)

    def ended(self, name: str, seconds: float) -> None:
        self.say(f"start-up  {name} {duration(seconds)}  ({duration(time.monotonic() - self.launched)} since launch)")

    @contextmanager
    def phase(self, name: str, started: float | None = None) -> Iterator[None]:
        """`started`: when the phase began, if before this call (a time.monotonic() reading)."""
        started = time.monotonic() if started is None else started
        done = threading.Event()
        if self.heartbeat > 0:
            threading.Thread(target=self._beat, args=(name, started, done), daemon=True, name="heartbeat").start()
        try:
            yield
        finally:
            done.set()
        self.ended(name, time.monotonic() - started)  # not reached when the phase raised: its error says why

    def _beat(self, name: str, started: float, done: threading.Event) -> None:
        beats = 1
        while not done.wait(max(0.0, started + beats * self.heartbeat - time.monotonic())):
            self.say(f"start-up  still {name} after {duration(time.monotonic() - started)}")
            beats += 1


# ---- what the run was asked to do differently ----

def stage_defaults(config: TrainConfig, janus) -> dict[str, object]:
    """Every setting's value when not given: Table 2 for the stage and the model's size, else the field's default."""
    column = table2(stage_for(config.stage, model_size(janus)))
    out: dict[str, object] = {}
    for kind in SECTIONS.values():
        for f in dataclasses.fields(kind):
            if f.name in column:
                out[f.name] = column[f.name]
            elif f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
    return out


def config_summary(config: TrainConfig, janus, ranks: int, plan_line: str, width: int = 116) -> list[str]:
    """A few lines for the log in place of the whole config (that is in the run's config.yaml): the batch plan
    and every setting that differs from the stage's defaults, as flags, the default in brackets where there is one.
    The attention backend is left out when it is the one chosen for this machine anyway."""
    defaults = {**stage_defaults(config, janus), "attention": default_attention()}
    values = {k: v for section in SECTIONS for k, v in config.as_dict()[section].items()}
    changed = []
    for name, value in values.items():
        default = defaults.get(name)
        if name == "output" or value == default:
            continue
        shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
        if default in (None, [], ""):
            changed.append(f"{flag(name)} {shown}")
        else:
            was = " ".join(map(str, default)) if isinstance(default, list) else str(default)
            changed.append(f"{flag(name)} {shown} [{was}]")
    lines = [f"Stage {config.stage}, {ranks} ranks, {plan_line}; the whole config: "
             f"{config_file(config.checkpoint.output)}"]
    line = "  set:"
    for item in changed:
        if len(line) + 1 + len(item) > width and line.strip() != "set:":
            lines.append(line)
            line = "   "
        line += " " + item
    if changed:
        lines.append(line)
    return lines


class StopFlag:
    """SIGTERM / SIGUSR1 (Slurm's pre-emption warning) on any rank: checkpoint within two steps, on every rank at the
    same step.

    The signalled rank says so at once: Python runs a signal's handler only when the main thread is back in the
    interpreter, and a training thread can wait in a collective or a long kernel for minutes. So the handler only
    sets the flag, and the line is written by a small thread that the signal wakes through `signal.set_wakeup_fd`
    (the interpreter's C-level handler writes the signal's number there at once)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.raised = False
        self._flag: torch.Tensor | None = None  # this rank's flag, reduced over ranks in place
        self._host: torch.Tensor | None = None  # the reduced flag in host memory (pinned on a GPU machine)
        self._wait = None  # waits for the reduction started at the previous call
        rank = launch_rank()
        self._lines = {int(sig): (f"rank {rank}: {sig.name} received: every rank saves a checkpoint within 2 steps, "
                                  "then exits\n").encode() for sig in self.SIGNALS}
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # set_wakeup_fd's condition: a full pipe must never block a handler
        self._previous_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        threading.Thread(target=self._acknowledge, daemon=True, name="stop-signal").start()

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def _acknowledge(self) -> None:
        while woken := os.read(self._read, 64):  # empty once close() closed the other end
            for signum in woken:  # one byte per signal that has a Python handler (SIGINT too)
                if signum in self._lines:
                    self.raised = True
                    os.write(1, self._lines[signum])  # the process's stdout, whatever sys.stdout is now
        os.close(self._read)

    def close(self) -> None:
        """The handlers and wakeup descriptor it replaced, back (a process that outlives its training: tests)."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        signal.set_wakeup_fd(self._previous_fd)
        os.close(self._write)

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


class StepTimes:
    """Seconds per step for the ETA: an exponential moving average of each step's wall time (checkpoints and
    validation included, as the run will spend them), bias-corrected so the first steps weigh what they should. The
    process's first step carries one-off costs (first gathers, allocator warm-up): it stands alone until another
    step is seen, then is left out."""

    def __init__(self, weight: float = 0.05):
        self.weight, self.mean, self.seen, self.first = weight, 0.0, 0, None

    def add(self, seconds: float) -> None:
        if self.first is None:
            self.first = seconds
            return
        self.seen += 1
        self.mean += self.weight * (seconds - self.mean)

    @property
    def seconds(self) -> float:
        if not self.seen:
            return self.first or 0.0
        return self.mean / (1 - (1 - self.weight) ** self.seen)


class Monitor:
    """Rank 0's record of the run every --log-every steps (and the first and last): a log line,
    metrics.jsonl, TensorBoard event files, and W&B when asked for. Every rank calls `maybe_log` every step (the
    figures are summed over ranks on log steps; the timings are kept on every step)."""

    def __init__(self, config: TrainConfig, rank: int, start_step: int, clock: Callable[[], float] = time.monotonic,
                 steps_per_epoch: float | None = None):
        """`steps_per_epoch`: the data's epoch, when the run was given --epochs (each line then says which epoch)."""
        self.config, self.start_step, self.active, self.clock = config, start_step, rank == 0, clock
        self.steps_per_epoch = steps_per_epoch
        self.times = StepTimes()
        self.last_step_end = self.last_checkpoint = clock()  # until a save: what a crash would lose began here
        self.waited = self.stepped = 0.0  # data wait and step seconds since the last log line, over `steps` steps
        self.steps = 0
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
                  seconds: float, applied: bool, too_long: dict[str, int], *, targets: torch.Tensor | None = None,
                  data_wait: float = 0.0) -> dict | None:
        """On log steps only: reading the losses (and summing the counts over ranks) waits for the device.
        `targets`: the step's target count per task, summed over ranks (a task without one shows no loss);
        `data_wait`: seconds this step waited for its micro-batches."""
        now = self.clock()
        self.times.add(now - self.last_step_end)
        self.last_step_end, self.steps = now, self.steps + 1
        self.waited, self.stepped = self.waited + data_wait, self.stepped + seconds
        if not self.due(step):
            return None
        trained = [True] * len(TASKS) if targets is None else [n > 0 for n in targets.tolist()]
        losses = [v if t else None for v, t in zip(task_loss.tolist(), trained, strict=True)]
        record = {**step_record(step, losses, lr, engine, micro_batches, seconds, self.config, applied, too_long),
                  "epoch": step / self.steps_per_epoch if self.steps_per_epoch else None, **self.timings(step)}
        log(format_record(record))
        self.record(record)
        return record

    def timings(self, step: int) -> dict:
        """Data wait per step and its share of the step time (since the last log line), smoothed step time, ETA,
        time since the last checkpoint; resets the data-wait sums."""
        per_step = self.times.seconds
        out = {"data_wait_seconds": self.waited / max(self.steps, 1),
               "data_wait_share": self.waited / self.stepped if self.stepped > 0 else 0.0,
               "step_seconds_smoothed": per_step,
               "eta_seconds": (self.config.optim.train_steps - step) * per_step,
               "since_checkpoint_seconds": self.clock() - self.last_checkpoint}
        self.waited = self.stepped = 0.0
        self.steps = 0
        return out

    def checkpointed(self, path: Path) -> None:
        self.last_checkpoint = self.clock()
        log(f"saved {path}")

    def record(self, record: dict) -> None:
        if not self.active:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        flat = {f"loss/{t}": v for t, v in record["loss"].items() if v is not None}
        flat.update({k: v for k, v in record.items()
                     if isinstance(v, int | float) and k not in ("step", "train_steps")})
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


def accelerator_memory(device: torch.device) -> tuple[int | None, int | None]:
    """(peak allocated since the last call, reserved now) in bytes, the largest over ranks (the rank nearest to
    running out is the one that matters); (None, None) off CUDA. Collective on CUDA."""
    if device.type != "cuda":
        return None, None
    memory = torch.tensor([torch.cuda.max_memory_allocated(device), torch.cuda.memory_reserved(device)],
                          dtype=torch.float64, device=device)
    torch.cuda.reset_peak_memory_stats(device)  # so each log line shows its own interval's peak
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    peak, reserved = memory.tolist()
    return int(peak), int(reserved)


def step_record(step: int, task_loss: list[float | None], lr: float, engine, micro_batches: list[PackedBatch],
                seconds: float, config: TrainConfig, applied: bool, too_long: dict[str, int]) -> dict:
    """The log line's figures, all from pipeline/metrics.py, on counts summed over every rank; `task_loss`: None for
    a task without targets in the step; `too_long`: this rank's samples dropped so far for not fitting --seq-len,
    per task. Collective."""
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
    peak, reserved = accelerator_memory(engine.device)
    # packing: real / computed tokens (1 for flat micro-batches, by construction); fill: real / the token budget
    budget = dist.get_world_size() * len(micro_batches) * config.data.rows_per_micro_batch * config.data.seq_len
    return {"step": step, "train_steps": config.optim.train_steps, "loss": dict(zip(TASKS, task_loss, strict=True)),
            "lr": lr, "grad_norm": None if grad_norm is None else float(grad_norm), "skipped": not applied,
            "step_seconds": seconds, **figures.as_dict(), "budget_fill": total.real_tokens / budget,
            "memory_peak_allocated_bytes": peak, "memory_reserved_bytes": reserved,
            "too_long": {t: int(n) for t, n in zip(TASKS, dropped.tolist(), strict=True)}}


def format_record(r: dict) -> str:
    """One log line: `step N / total` (and the epochs done, for a run given --epochs), loss per task (- where the
    step had none of it), then throughput, memory, data wait, smoothed step time, ETA and time since the last
    checkpoint."""
    losses = " ".join(f"{SHORT[t]} " + ("-" if v is None else f"{v:.4f}") for t, v in r["loss"].items())
    norm = "-" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    memory = "" if r["memory_peak_allocated_bytes"] is None else (
        f"  mem {r['memory_peak_allocated_bytes'] / 2**30:.1f} GiB (reserved {r['memory_reserved_bytes'] / 2**30:.1f})")
    epoch = "" if r.get("epoch") is None else f"  epoch {r['epoch']:.2f}"
    return (f"step {r['step']:7d} / {r['train_steps']}{epoch}  loss {losses}  lr {r['lr']:.3e}  grad-norm {norm}  "
            f"{r['tokens_per_s']:,.0f} tok/s  MFU {mfu}{memory}  "
            f"data-wait {r['data_wait_seconds']:.3f}s ({r['data_wait_share']:.0%})  "
            f"{r['step_seconds_smoothed']:.2f} s/step  ETA {duration(r['eta_seconds'])}  "
            f"since ckpt {duration(r['since_checkpoint_seconds'])}  packing {r['packing_efficiency']:.1%}  "
            f"fill {r['budget_fill']:.1%}" + ("  SKIPPED (non-finite)" if r["skipped"] else "")
            + ("  too long: " + ", ".join(f"{t} {n}" for t, n in r["too_long"].items() if n)
               if any(r["too_long"].values()) else ""))
