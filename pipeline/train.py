"""The three-stage Janus-Pro training loop on DeepSpeed ZeRO-3.

    deepspeed launchers/stage1.py --model 7b --data MANIFEST... --init WEIGHTS --output DIR

`main()` (at the bottom) sets up the plan, the engine, the data path and the resume, then calls `train()`,
whose loop fits one screen. Each stage is its own DeepSpeed engine: which parameters train cannot change
inside one. Logging, stop signals and the watchdog live in pipeline/monitor.py.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from torch.optim.lr_scheduler import LambdaLR

from model.batch import PackedBatch
from model.config import load_config
from model.generate import decode_images, generate_image_ids, image_grid
from model.janus import JanusProForTraining
from model.manifest import Manifest, tokenizer_fingerprint, weights_fingerprint
from model.sample import TASKS
from model.stages import set_trainable, stage_for
from model.tokenizer import SpecialTokens, load_tokenizer
from model.weights import checkpoint_config, load_checkpoint
from pipeline import checkpoint
from pipeline.attention import use_attention
from pipeline.data import DataConfig, DataPipeline
from pipeline.ds_config import BatchPlan, batch_plan, deepspeed_config
from pipeline.memory import estimate_memory, format_dry_run
from pipeline.metrics import BatchCounts, batch_counts, peak_flops, step_figures
from pipeline.monitor import Monitor, StopFlag, Watchdog
from pipeline.reader import SourceSpec
from pipeline.train_config import TrainConfig, resolve


def lr_factor(step: int, warmup_steps: int, decay_style: str = "constant", decay_steps: int = 0) -> float:
    """The learning rate of optimizer step `step` (from 0) as a share of the stage's rate.

    Linear warm-up over `warmup_steps`, then Table 2's constant rate; or, for a run that must end
    converged (a short fine-tune, the memorisation test), a linear or cosine decay that reaches 0 at
    `decay_steps`. DeepSpeed's WarmupLR would warm up on a log curve by default; this is the paper's linear one.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay_style == "constant":
        return 1.0
    done = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    if decay_style == "linear":
        return 1.0 - done
    if decay_style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * done))
    raise ValueError(f"lr_decay_style must be constant, linear or cosine, not {decay_style!r}")


def step_loss(loss_sum: torch.Tensor, step_counts: torch.Tensor, weights: torch.Tensor, mode: str) -> torch.Tensor:
    """This micro-batch's share of the step loss, normalised by the targets of the whole global step.

    token: sum_t w_t L_t / sum_t w_t N_t (one token mean over the global batch);
    task:  sum_t w_t (L_t / N_t) / sum_{t present} w_t (each task's mean, then weighted).
    Summing this over micro-batches and ranks gives the step's loss exactly.
    """
    if mode == "token":
        return (weights * loss_sum).sum() / (weights * step_counts).sum().clamp(min=1)
    if mode == "task":
        present = (step_counts > 0).to(weights.dtype)
        return (weights * loss_sum / step_counts.clamp(min=1)).sum() / (weights * present).sum().clamp(min=1e-12)
    raise ValueError(f"loss_normalisation must be 'token' or 'task', not {mode!r}")


def log(rank: int, *parts: object) -> None:
    if rank == 0:
        print(*parts, flush=True)


# ---- set-up ----

def model_config_for(config: TrainConfig, image_token_id: int):
    init = Path(config.init) if config.init else None
    if init is not None and (init / "config.json").is_file() and not (init / "checkpoints").is_dir():
        return checkpoint_config(init, image_token_id)  # released weights: their own config wins
    model_config = load_config(config.model, image_token_id)
    model_config.image_token_id = image_token_id
    return model_config


def deepspeed_run_config(config: TrainConfig, plan: BatchPlan, special: SpecialTokens) -> dict:
    width = model_config_for(config, special.image_placeholder).text_config.hidden_size
    template = config.ds_config or ("zero3_bf16" if torch.cuda.is_available() else "zero3_cpu")
    return deepspeed_config(template, plan, width, config.learning_rate, tuple(config.adam_betas),
                            config.weight_decay, config.adam_eps, config.grad_clip)


def build_model(config: TrainConfig, ds: dict, image_token_id: int) -> JanusProForTraining:
    """Built sharded (each rank holds only its part), then filled from --init if given."""
    with deepspeed.zero.Init(config_dict_or_path=ds):
        model = JanusProForTraining(model_config_for(config, image_token_id))
    if config.init:
        init = Path(config.init)
        # A previous stage's run directory is consolidated with DeepSpeed's utilities first.
        source = checkpoint.consolidate(init) if (init / "checkpoints").is_dir() else init
        load_checkpoint(model, source)
    set_trainable(model, config.trainable)
    use_attention(model, config.attention)
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_engine(config: TrainConfig, ds: dict, special: SpecialTokens):
    """The stage's own DeepSpeed engine: only trainable parameters reach the optimizer."""
    model = build_model(config, ds, special.image_placeholder)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds,
        lr_scheduler=lambda opt: LambdaLR(opt, lambda s: lr_factor(
            s, config.warmup_steps, config.lr_decay_style, config.lr_decay_steps or config.train_steps)))
    return engine


def vq_fingerprint(model: JanusProForTraining) -> str:
    with deepspeed.zero.GatheredParameters(list(model.model.vqmodel.parameters())):
        return weights_fingerprint(model.model.vqmodel)


def data_config(config: TrainConfig, manifests: list[str], tokenizer_print: str, vq_print: str | None,
                training: bool = True) -> DataConfig:
    weights = config.data_weights or [1.0] * len(manifests)
    tasks = [Manifest.read(m).task for m in manifests]
    ratio = config.ratio if training else [float(t in tasks) for t in TASKS]
    return DataConfig(
        sources=[SourceSpec(m, w) for m, w in zip(manifests, weights, strict=True)], ratio=tuple(ratio),
        seq_len=config.seq_len, rows_per_micro_batch=config.rows_per_micro_batch, ratio_unit=config.ratio_unit,
        guidance_dropout=config.guidance_dropout if training else 0.0, eoi_is_target=config.eoi_is_target,
        seed=config.seed if training else 12345, num_workers=config.num_workers,
        allow_fingerprint_mismatch=config.allow_fingerprint_mismatch,
        tokenizer_fingerprint=tokenizer_print, vq_fingerprint=vq_print)


# ---- the loop ----

def train(config: TrainConfig, plan: BatchPlan, engine, data: DataPipeline, tokenizer,
          start_step: int, device: torch.device, val_config: DataConfig | None, stop: StopFlag) -> int:
    rank, special = dist.get_rank(), SpecialTokens.from_tokenizer(tokenizer)
    weights = torch.tensor(config.task_loss_weights, dtype=torch.float32, device=device)
    watchdog, batches = Watchdog(config.watchdog_seconds), iter(data)
    monitor = Monitor(config, rank)
    nonfinite_in_a_row, step = 0, start_step
    while step < config.train_steps:
        started, lr = time.perf_counter(), engine.get_lr()[0]  # the rate this step uses
        micro_batches = [next(batches).to(device) for _ in range(plan.accumulation_steps)]
        loss_sums, step_counts, applied = optimizer_step(engine, micro_batches, weights, config.loss_normalisation)
        step += 1
        watchdog.beat()
        task_loss = (loss_sums / step_counts.clamp(min=1)).tolist()
        nonfinite_in_a_row = 0 if applied else nonfinite_in_a_row + 1
        if nonfinite_in_a_row >= config.max_nonfinite_steps:
            raise FloatingPointError(f"step {step}: {nonfinite_in_a_row} non-finite steps in a row; task losses "
                                     f"{dict(zip(TASKS, task_loss, strict=True))}")
        if step % config.log_every == 0 or step == config.train_steps or step == start_step + 1:
            record = step_record(step, task_loss, lr, engine, micro_batches, time.perf_counter() - started,
                                 config, applied)
            log(rank, format_record(record))
            monitor.record(record)
        if val_config is not None and config.val_every and step % config.val_every == 0:
            log(rank, f"step {step:7d}  validation  " + "  ".join(
                f"{t} {v:.4f}" for t, v in validate(engine, val_config, special, config.val_batches, device).items()))
        if config.sample_every and step % config.sample_every == 0:
            path = sample_grid(engine, tokenizer, config, step)
            log(rank, f"step {step:7d}  samples {path}")
        stopping = stop.any_rank(device)
        if stopping or step % config.save_every == 0 or step == config.train_steps:
            path = checkpoint.save(engine, config.output, step, {"data": data.state_dict()}, config.keep_last)
            log(rank, f"saved {path}")
        if stopping:
            log(rank, f"stop signal: checkpointed step {step}, exiting")
            break
    monitor.close()
    return step


def optimizer_step(engine, micro_batches: list[PackedBatch], weights: torch.Tensor,
                   normalisation: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One optimizer step over this rank's micro-batches: (loss sums per task, target counts, applied), global.

    A step whose global gradient norm is not finite is not applied: DeepSpeed's ZeRO-3 optimizer then skips
    the update, Adam's moments and step count included, and clears the gradients, on every rank alike.
    """
    device, world = weights.device, dist.get_world_size()
    # The whole step's target count, on every rank, before the first backward.
    step_counts = torch.stack([b.target_counts() for b in micro_batches]).sum(0).to(device, torch.float32)
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


def step_record(step: int, task_loss: list[float], lr: float, engine, micro_batches: list[PackedBatch],
                seconds: float, config: TrainConfig, applied: bool) -> dict:
    """The log line's figures, all from pipeline/metrics.py, on counts summed over every rank."""
    counts = sum((batch_counts(b) for b in micro_batches), BatchCounts())
    summed = counts.to_tensor().to(engine.device)
    dist.all_reduce(summed)
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    figures = step_figures(BatchCounts.from_tensor(summed), seconds, dist.get_world_size(), engine.module.config,
                           config.trainable, config.gradient_checkpointing, peak_flops(device_name))
    grad_norm = engine.get_global_grad_norm()
    return {"step": step, "loss": dict(zip(TASKS, task_loss, strict=True)), "lr": lr,
            "grad_norm": None if grad_norm is None else float(grad_norm), "skipped": not applied,
            "step_seconds": seconds, **figures.as_dict(),
            "eta_hours": (config.train_steps - step) * seconds / 3600}


def format_record(r: dict) -> str:
    losses = "  ".join(f"{t} {v:.4f}" for t, v in r["loss"].items())
    norm = "-" if r["grad_norm"] is None else f"{r['grad_norm']:.3f}"
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    return (f"step {r['step']:7d}  {losses}  lr {r['lr']:.3e}  grad-norm {norm}  {r['tokens_per_s']:,.0f} tok/s  "
            f"{r['samples_per_s']:.1f} samples/s  MFU {mfu}  packing {r['packing_efficiency']:.1%}  "
            f"ETA {r['eta_hours']:.1f} h" + ("  SKIPPED (non-finite)" if r["skipped"] else ""))


@torch.no_grad()
def sample_grid(engine, tokenizer, config: TrainConfig, step: int) -> Path:
    """Images from the fixed prompts, with guidance. Every rank generates (ZeRO-3 gathers weights collectively
    in every forward, and each step is one token for every prompt, so the ranks stay in step); rank 0 saves."""
    engine.eval()
    ids = generate_image_ids(engine.module, tokenizer, config.sample_prompts, cfg=config.sample_cfg, seed=step,
                             backend="loop")
    # The VQ decoder reads its codebook's shape outside a module call, where ZeRO-3 has no hook to gather it.
    with deepspeed.zero.GatheredParameters(list(engine.module.model.vqmodel.parameters())):
        images = decode_images(engine.module, ids)
    engine.train()
    path = Path(config.output) / "samples" / f"step-{step:08d}.png"
    if dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, columns=len(images)).save(path)
    return path


@torch.no_grad()
def validate(engine, val_config: DataConfig, special: SpecialTokens, batches: int, device) -> dict[str, float]:
    """Loss per task on held-out shards; every rank runs the same number of batches (ZeRO-3 needs all)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sums, counts = torch.zeros(len(TASKS), device=device), torch.zeros(len(TASKS), device=device)
    engine.eval()
    for _, batch in zip(range(batches), DataPipeline(val_config, special, rank, world), strict=False):
        out = engine(batch.to(device))
        sums += out.loss_sum.float()
        counts += out.target_count.float()
    engine.train()
    dist.all_reduce(sums)
    dist.all_reduce(counts)
    return {t: (s / c).item() if c > 0 else math.nan for t, s, c in zip(TASKS, sums, counts, strict=True)}


def main(stage: int, argv: list[str] | None = None) -> None:
    stop = StopFlag()  # first: a pre-emption signal during start-up must not kill the rank
    config, args = resolve(stage, argv)
    if args.dry_run:
        return dry_run(config, args.world_size)
    if not config.data:
        raise SystemExit("--data: at least one manifest is needed")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # refuse an impossible batch plan before anything is built or any rank waits on another
        plan = batch_plan(config.rows_per_step, world, config.rows_per_micro_batch, config.gpus_per_node)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)

    tokenizer = load_tokenizer(config.tokenizer or config.init)
    special = SpecialTokens.from_tokenizer(tokenizer)
    ds = deepspeed_run_config(config, plan, special)
    if rank == 0:
        Path(config.output).mkdir(parents=True, exist_ok=True)
        config.save(Path(config.output) / "config.yaml")
        (Path(config.output) / "ds_config.json").write_text(json.dumps(ds, indent=2))
        print(f"Stage {stage}, {world} ranks, {plan.accumulation_steps} micro-batch(es) of "
              f"{plan.rows_per_micro_batch} row(s) per step\n{config.describe()}", flush=True)
    engine = build_engine(config, ds, special)

    fingerprints = (tokenizer_fingerprint(tokenizer), vq_fingerprint(engine.module))
    data = DataPipeline(data_config(config, config.data, *fingerprints), special, rank, world)
    val = data_config(config, config.val_data, *fingerprints, training=False) if config.val_data else None

    start_step = 0
    resume_from = checkpoint.latest_checkpoint(config.output) if config.resume == "auto" else (
        None if config.resume == "none" else Path(config.resume))
    if resume_from is not None:
        state = checkpoint.load(engine, resume_from)
        data.load_state_dict(state["data"])
        start_step = state["step"]
        log(rank, f"resumed from {resume_from} at step {start_step}")
    step = train(config, plan, engine, data, tokenizer, start_step, device, val, stop)
    log(rank, f"done at step {step}; checkpoints in {checkpoint.checkpoints_dir(config.output)}")
    dist.barrier()
    dist.destroy_process_group()


def dry_run(config: TrainConfig, world_size: int | None) -> None:
    """The batch plan (refused if impossible) and the per-GPU memory estimate, without building the model."""
    if not world_size:
        raise SystemExit("--dry-run needs --world-size")
    try:
        plan = batch_plan(config.rows_per_step, world_size, config.rows_per_micro_batch, config.gpus_per_node)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"Stage {config.stage}, model {config.model}: {plan.rows_per_step} rows/step over {world_size} ranks = "
          f"{plan.accumulation_steps} micro-batch(es) of {plan.rows_per_micro_batch} row(s) x {config.seq_len} "
          f"tokens per rank")
    stage = replace(stage_for(config.stage, config.model), ratio=tuple(config.ratio),
                    trainable=tuple(config.trainable), seq_len=config.seq_len)
    print(format_dry_run(estimate_memory(config.model, stage, world_size, config.rows_per_micro_batch,
                                         config.seq_len, config.gradient_checkpointing, config.gpus_per_node)))
