"""The configuration of a training run: Table 2 defaults (model/stages.py) < a YAML file < flags.

Every knob is named after the thing it controls. The resolved configuration is printed at start and
saved beside the checkpoints (`OUTPUT/config.yaml`).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from model.stages import stage_for


@dataclass
class TrainConfig:
    stage: int
    model: str = "tiny"             # preset (tiny, 1b, 7b) or a checkpoint directory's config
    data: list[str] = field(default_factory=list)      # manifests (file or directory), any task
    data_weights: list[float] = field(default_factory=list)  # per manifest, among its task; default 1
    val_data: list[str] = field(default_factory=list)
    init: str | None = None          # released weights (either layout), or a previous stage's run directory
    tokenizer: str | None = None     # default: the --init directory
    output: str = "runs/stage"
    # Table 2 (defaults filled from model/stages.py)
    learning_rate: float | None = None
    warmup_steps: int | None = None
    train_steps: int | None = None
    rows_per_step: int | None = None  # the paper's batch size, counted in packed rows of seq_len tokens
    ratio: list[float] | None = None  # und : text : gen
    trainable: list[str] | None = None
    adam_betas: list[float] | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None   # 0 turns clipping off
    seq_len: int | None = None
    lr_decay_style: str = "constant"   # Table 2; linear or cosine decay to 0 at lr_decay_steps
    lr_decay_steps: int | None = None  # default: train_steps
    adam_eps: float = 1e-8
    # data path
    rows_per_micro_batch: int = 1
    ratio_unit: str = "samples"
    guidance_dropout: float = 0.1
    eoi_is_target: bool = False
    num_workers: int = 2
    allow_fingerprint_mismatch: bool = False
    # loss: "token" = one token mean over the global batch; "task" = per-task means, then weighted
    loss_normalisation: str = "token"
    task_loss_weights: list[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # model and system
    gradient_checkpointing: bool = False
    attention: str = "sdpa"
    ds_config: str | None = None     # ds_configs/ name or path; default zero3_bf16 on GPU, zero3_cpu on CPU
    gpus_per_node: int = 8
    # checkpoints, validation, logging, failure handling
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"             # auto: the latest complete checkpoint in OUTPUT if any; none; or a path
    val_every: int = 0
    val_batches: int = 4
    log_every: int = 10
    sample_every: int = 2000          # a PNG grid from sample_prompts every N steps (0: never); all ranks take part
    sample_prompts: list[str] = field(default_factory=lambda: [
        "A red apple on a wooden table.", "A lighthouse on a cliff at sunset.", "A cat sleeping on a sofa.",
        "An astronaut riding a horse on the moon."])
    sample_cfg: float = 5.0
    wandb_project: str | None = None  # also log to Weights & Biases (pip install -e '.[wandb]')
    max_nonfinite_steps: int = 5
    watchdog_seconds: float = 1800.0
    seed: int = 0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(dataclasses.asdict(self), sort_keys=False))

    def describe(self) -> str:
        return yaml.safe_dump(dataclasses.asdict(self), sort_keys=False)


TABLE2_FIELDS = {"learning_rate": "learning_rate", "warmup_steps": "warmup_steps", "train_steps": "train_steps",
                 "rows_per_step": "batch_rows", "ratio": "ratio", "trainable": "trainable",
                 "adam_betas": "adam_betas", "weight_decay": "weight_decay", "grad_clip": "grad_clip",
                 "seq_len": "seq_len"}


def _parser(stage: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=f"Janus-Pro Stage {stage} training (DeepSpeed ZeRO-3).")
    parser.add_argument("--config", help="YAML file of TrainConfig fields; flags override it")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the batch plan and per-GPU memory estimate for --world-size, build nothing")
    parser.add_argument("--world-size", type=int, help="data-parallel size for --dry-run")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    for f in dataclasses.fields(TrainConfig):
        if f.name == "stage":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = str(f.type)
        if kind.startswith("list"):
            item = float if "float" in kind else str
            parser.add_argument(flag, nargs="+", type=item, default=None)
        elif kind == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            base = kind.split(" |")[0]
            parser.add_argument(flag, type={"int": int, "float": float}.get(base, str), default=None)
    return parser


def resolve(stage: int, argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Table 2 for the stage and model size, then the YAML file, then the flags."""
    args = _parser(stage).parse_args(argv)
    values: dict = {}
    if args.config:
        values.update(yaml.safe_load(Path(args.config).read_text()) or {})
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"{args.config}: unknown setting(s) {sorted(unknown)}")
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    values["stage"] = stage
    config = TrainConfig(**values)
    table = stage_for(stage, "7b" if config.model == "7b" else "1b")
    for ours, theirs in TABLE2_FIELDS.items():
        if getattr(config, ours) is None:
            value = getattr(table, theirs)
            setattr(config, ours, list(value) if isinstance(value, tuple) else value)
    return config, args
