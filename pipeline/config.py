"""The configuration of a training run, one dataclass per concern: this file is its documentation.

Precedence: Table 2 for the stage and the model's size (model/stages.py) < a YAML file (`--config`) < flags.
Every field is a flag of the stage launchers (`--learning-rate` and `--learning_rate` both work; no prefix
abbreviations), with its help, default and choices in `--help`. Values are type-checked and range-checked
when a section is built, whatever they came from; paths and data are checked by pipeline/preflight.py before
anything heavy starts. The resolved configuration is saved beside the checkpoints (`OUTPUT/config.yaml`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from transformers import HfArgumentParser, JanusConfig

from model.config import PRESETS, model_config, model_size
from model.hub import RELEASE_PRESETS, HubError, cached_snapshot, download_command, is_repo_id, resolve_weights
from model.lora import ADAPTED_PARTS, DEFAULT_TARGETS, LoraSettings
from model.stages import STAGES, TRAINABLE_PARTS, Stage, stage_for
from pipeline import epochs
from pipeline.attention import Backend, default_attention
from pipeline.run_dir import config_file, is_run_directory


class ConfigError(ValueError):
    """A user's mistake in flags, YAML or paths: reported as one `error:` line, without a traceback."""


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def doc(help: str, default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """A field with its help string (shown by --help); mutable defaults are copied per instance."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is Literal:
        return value in args
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


class Section:
    """Checks every field's type (a YAML `warmup_steps: '100'` is refused), then the section's own rules."""

    title: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and hints[f.name] is int and value.is_integer():
                value = int(value)  # 1e3 in YAML is a float
            if isinstance(value, int) and not isinstance(value, bool) and hints[f.name] is float:
                value = float(value)
            if isinstance(value, tuple):
                value = list(value)
            setattr(self, f.name, value)
            if not _matches(value, hints[f.name]):
                raise ConfigError(f"{flag(f.name)}: {value!r} is not {_type_name(hints[f.name])}")
        self.check()

    def check(self) -> None:
        """Range checks; raise ConfigError naming the flag."""


def _type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "unset"}.get(hint, str(hint))


def need(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{flag(name)}: {why}")


@dataclass(kw_only=True)
class ModelConfig(Section):
    title: ClassVar[str] = "model"
    model: str | None = doc(f"a preset ({', '.join(PRESETS)}) or a checkpoint directory (config.json); unset: "
                            "the model --init holds", None)
    init: str | None = doc("released weights (either layout: a folder, or a Hugging Face hub id such as "
                           "deepseek-ai/Janus-Pro-1B, cached or downloaded) or a previous stage's run directory",
                           None)
    tokenizer: str | None = doc("tokenizer directory; unset: --init's (of a run directory: the tokenizer it used)",
                                None)
    attention: Backend | None = doc(
        "attention backend: sdpa (any device; the CPU's), flash_attention_2 (pip install flash-attn), varlen (CUDA); "
        "unset: varlen on CUDA (flash_attention_2 where flash-attn imports), sdpa on the CPU", None)
    gradient_checkpointing: bool = doc("recompute each LLM layer in backward (less memory, ~1/3 more compute)",
                                       False)

    def check(self) -> None:
        if self.attention is None:  # resolved when built, so config.yaml records the backend actually used
            self.attention = default_attention()


@dataclass(kw_only=True)
class DataConfig(Section):
    title: ClassVar[str] = "data"
    data: list[str] = doc("training manifests (file or directory), any task; mixed by --ratio", [])
    data_weights: list[float] = doc("per --data manifest, its weight among the manifests of its task "
                                    "(unset: 1 each)", [])
    val_data: list[str] = doc("held-out manifests for validation", [])
    ratio: list[float] = doc("Table 2: und : text : gen, mixed inside every step")
    seq_len: int = doc("Table 2: tokens per packed row", 4096)
    rows_per_micro_batch: int = doc("packed rows per rank per forward: a token budget of rows x --seq-len", 1)
    pad_rows: bool = doc("build each micro-batch as its rows, each padded to --seq-len (fixed shapes); default: "
                         "one flat stream of whole samples up to the token budget, no padding computed", False)
    ratio_unit: Literal["samples", "tokens"] = doc("what --ratio counts", "samples")
    guidance_dropout: float = doc("P(generation prompt -> pad), for classifier-free guidance", 0.1)
    eoi_is_target: bool = doc("train <end_of_image> as a generation target", False)
    buffer_size: int = doc("samples the packer chooses from", 64)
    max_age: int = doc("rows a sample may wait in the packer's buffer before it is packed first", 16)
    max_too_long_in_a_row: int = doc("stop when this many samples of one task in a row are longer than --seq-len "
                                     "(each is dropped and counted)", 256)
    num_workers: int = doc("threads decoding images and building batches", 2)
    prefetch: int = doc("micro-batches built ahead of the step", 4)
    allow_fingerprint_mismatch: bool = doc("train on shards made with another tokenizer or VQ (not advised)",
                                           False)
    seed: int = doc("seed of the data order, guidance dropout and the model's random state", 0)

    def check(self) -> None:
        need(len(self.ratio) == 3 and min(self.ratio) >= 0 and sum(self.ratio) > 0, "ratio",
             f"three non-negative parts (und text gen), not all 0; got {self.ratio}")
        need(not self.data_weights or len(self.data_weights) == len(self.data), "data_weights",
             f"one weight per --data manifest ({len(self.data)}); got {len(self.data_weights)}")
        need(all(w > 0 for w in self.data_weights), "data_weights", "weights must be positive")
        need(self.seq_len > 0, "seq_len", "must be positive")
        need(0 <= self.guidance_dropout <= 1, "guidance_dropout", "a probability, in [0, 1]")
        for name in ("rows_per_micro_batch", "buffer_size", "max_age", "max_too_long_in_a_row", "num_workers",
                     "prefetch"):
            need(getattr(self, name) >= 1, name, "must be at least 1")


# A fine-tune's warm-up, as a share of its steps: Table 2's warm-ups are 3% (Stage I) and 2% (Stage II) of theirs.
WARMUP_SHARE = 0.03


def fine_tune_warmup(table_warmup: int, train_steps: int) -> int:
    """The warm-up of a run shorter or longer than its stage's Table 2 length, when --warmup-steps is unset: Table
    2's 5,000 steps would outlast a 1,000-step fine-tune. Never longer than Table 2's (Stage III has none), and a
    one-step run has none: the warm-up must end before the run does."""
    return min(table_warmup, max(1, round(WARMUP_SHARE * train_steps)), train_steps - 1)


def check_warmup(optim: OptimConfig) -> None:
    """At launch, not in OptimConfig.check: run directories saved before this rule must still load (export, resume
    checks)."""
    need(optim.warmup_steps < optim.train_steps, "warmup_steps",
         f"{optim.warmup_steps} is not below --train-steps {optim.train_steps}: the learning rate would never reach "
         f"--learning-rate; give --warmup-steps below {optim.train_steps} (e.g. "
         f"{fine_tune_warmup(optim.warmup_steps, optim.train_steps)}) or more --train-steps")


@dataclass(kw_only=True)
class OptimConfig(Section):
    title: ClassVar[str] = "optimiser and schedule"
    learning_rate: float = doc("Table 2: the stage's peak learning rate")
    warmup_steps: int = doc("linear warm-up steps, below --train-steps; unset: Table 2's at the stage's Table 2 "
                            f"length, else (a fine-tune) {WARMUP_SHARE:g} x --train-steps rounded, at least 1, at "
                            "most Table 2's")
    train_steps: int = doc("Table 2: optimizer steps of the stage (or give --epochs)")
    rows_per_step: int = doc("Table 2's batch size: packed rows of --seq-len tokens per optimizer step, global")
    trainable: list[str] = doc(f"Table 2: the parts that train, of {', '.join(TRAINABLE_PARTS)}")
    lr_decay_style: Literal["constant", "linear", "cosine"] = doc(
        "after warm-up: constant (Table 2), or a linear/cosine decay to 0 at --lr-decay-steps", "constant")
    lr_decay_steps: int | None = doc("where a decay reaches 0 (unset: --train-steps)", None)
    adam_betas: list[float] = doc("Table 2: AdamW beta1 beta2", [0.9, 0.95])
    adam_eps: float = doc("AdamW epsilon", 1e-8)
    weight_decay: float = doc("Table 2: AdamW weight decay", 0.0)
    grad_clip: float = doc("Table 2: global gradient-norm clip (0: off)", 1.0)
    loss_normalisation: Literal["token", "task"] = doc(
        "token: one token mean over the global batch; task: per-task means, then weighted", "token")
    task_loss_weights: list[float] = doc("und text gen loss weights", [1.0, 1.0, 1.0])
    max_nonfinite_steps: int = doc("stop after this many non-finite steps in a row (each is skipped)", 5)

    def check(self) -> None:
        need(self.learning_rate >= 0, "learning_rate", "must be 0 (weights unchanged: tests, a dry check) or more")
        need(self.warmup_steps >= 0, "warmup_steps", "must be 0 or more")
        need(self.train_steps >= 1, "train_steps", "must be at least 1")
        need(self.rows_per_step >= 1, "rows_per_step", "must be at least 1")
        unknown = sorted(set(self.trainable) - set(TRAINABLE_PARTS))
        need(not unknown, "trainable", f"cannot train {unknown}; parts are {', '.join(TRAINABLE_PARTS)} (the VQ "
             "never trains)")
        need(self.lr_decay_steps is None or self.lr_decay_steps > self.warmup_steps, "lr_decay_steps",
             "must be after --warmup-steps")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "adam_betas",
             f"two numbers in [0, 1); got {self.adam_betas}")
        need(self.adam_eps > 0, "adam_eps", "must be positive")
        need(self.weight_decay >= 0, "weight_decay", "must be 0 or more")
        need(self.grad_clip >= 0, "grad_clip", "must be 0 (off) or more")
        need(len(self.task_loss_weights) == 3 and min(self.task_loss_weights) >= 0, "task_loss_weights",
             f"three non-negative weights (und text gen); got {self.task_loss_weights}")
        need(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be at least 1")

    @property
    def decay_steps(self) -> int:
        return self.lr_decay_steps or self.train_steps


# What a resumed run may not change silently (it changes what is trained): the name a user passes to
# --allow-config-change, and where it lives in the config ("data" is compared by the manifests' contents).
RESUME_GUARDED = {"stage": "stage", "model": "model.model", "seq_len": "data.seq_len", "ratio": "data.ratio",
                  "trainable": "optim.trainable", "seed": "data.seed", "data": "data.data", "lora": "lora"}


@dataclass(kw_only=True)
class CheckpointConfig(Section):
    title: ClassVar[str] = "checkpoints"
    output: str = doc("the run directory: config, checkpoints, logs, samples", "runs/stage")
    save_every: int = doc("steps between checkpoints (and at the end, and on SIGTERM/SIGUSR1)", 1000)
    keep_last: int = doc("complete checkpoints kept", 3)
    resume: str = doc("auto: the newest intact checkpoint in --output, if any; none; or a checkpoint path",
                      "auto")
    trust_checkpoint: bool = doc("load checkpoints this code did not write (no file list in their COMPLETE), "
                                 "unverified; their files are still read as data only", False)
    allow_config_change: list[str] = doc("settings a resumed run may change on purpose, of "
                                         f"{', '.join(RESUME_GUARDED)}", [])

    def check(self) -> None:
        unknown = sorted(set(self.allow_config_change) - set(RESUME_GUARDED))
        need(not unknown, "allow_config_change", f"{unknown}: choose from {', '.join(RESUME_GUARDED)}")
        need(self.save_every >= 1, "save_every", "must be at least 1")
        need(self.keep_last >= 1, "keep_last", "must be at least 1")


@dataclass(kw_only=True)
class LoraConfig(Section):
    title: ClassVar[str] = "LoRA (peft): low-rank adapters in place of training the LLM whole"
    lora_rank: int = doc("rank of the LoRA adapters; 0: off (the default), the LLM trains whole as --trainable says. "
                         f"On: the own weights of {' and '.join(ADAPTED_PARTS)} (the LLM, SigLIP) freeze, adapters on "
                         "--lora-target-modules train, and every other --trainable part (adaptors, generation "
                         "embedding and head, LM head) trains whole", 0)
    lora_alpha: float | None = doc("the adapters' output is scaled by alpha / rank; unset: 2 x --lora-rank (a scale "
                                   "of 2 at any rank)", None)
    lora_dropout: float = doc("dropout on each adapter's input while training, in [0, 1) (peft's lora_dropout)", 0.05)
    lora_target_modules: str = doc("the layers that get adapters: a regular expression peft matches against whole "
                                   "module names (linear layers of the LLM or SigLIP); default: the LLM's attention "
                                   "and MLP projections", DEFAULT_TARGETS)

    def check(self) -> None:
        need(self.lora_rank >= 0, "lora_rank", "must be 0 (off) or more")
        need(0 <= self.lora_dropout < 1, "lora_dropout", f"a probability in [0, 1); got {self.lora_dropout}")
        need(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "must be positive")
        try:
            re.compile(self.lora_target_modules)
        except re.error as error:
            raise ConfigError(f"{flag('lora_target_modules')}: not a regular expression ({error})") from None
        if self.lora_rank and self.lora_alpha is None:  # resolved here, so config.yaml records the alpha used
            self.lora_alpha = 2.0 * self.lora_rank

    def settings(self) -> LoraSettings | None:
        """The adapters' settings; None with LoRA off."""
        if not self.lora_rank:
            return None
        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                            target_modules=self.lora_target_modules)


def check_lora(lora: LoraConfig, trainable: list[str], janus: JanusConfig) -> None:
    """LoRA adapts a part the stage trains (the LLM), on layers that exist: checked on the meta model, at start."""
    if not lora.lora_rank:
        return
    # peft is imported only where adapters are made (model/lora.py): a missing one is said here, before any rank waits.
    need(importlib.util.find_spec("peft") is not None, "lora_rank", "LoRA needs peft: pip install "
         "'janus-pipeline[train]' (in a checkout: pip install -e '.[train]')")
    need("llm" in trainable, "lora_rank", f"the stage does not train the LLM (--trainable {' '.join(trainable)}); "
         "LoRA adapts the LLM in its place: add llm to --trainable or drop --lora-rank")
    from model.lora import target_problem
    from model.summary import meta_model

    problem = target_problem(meta_model(janus), lora.lora_target_modules)
    need(problem is None, "lora_target_modules", f"{lora.lora_target_modules!r} {problem}")


SAMPLE_PROMPTS = ["A red apple on a wooden table.", "A lighthouse on a cliff at sunset.",
                  "A cat sleeping on a sofa.", "An astronaut riding a horse on the moon."]


@dataclass(kw_only=True)
class LoggingConfig(Section):
    title: ClassVar[str] = "logging and evaluation"
    log_every: int = doc("steps between log lines (metrics.jsonl, TensorBoard, W&B)", 10)
    val_every: int = doc("steps between validations on --val-data (0: never)", 0)
    val_batches: int = doc("micro-batches per validation, per rank", 4)
    sample_every: int = doc("steps between PNG grids from --sample-prompts (0: never); all ranks take part", 2000)
    sample_prompts: list[str] = doc("prompts of the sample grid", SAMPLE_PROMPTS)
    sample_cfg: float = doc("classifier-free guidance weight of the sample grid", 5.0)
    qa_every: int | None = doc("steps between answers to held-out understanding questions of --val-data (TensorBoard "
                               "text, W&B; 0: never; unset: --sample-every); all ranks take part", None)
    qa_samples: int = doc("held-out understanding samples each Q&A asks: the first ones of --val-data", 4)
    qa_max_new_tokens: int = doc("longest Q&A answer, in tokens (greedy; every rank runs this many forwards)", 64)
    wandb_project: str | None = doc("also log to this Weights & Biases project (pip install '.[wandb]')", None)
    heartbeat_seconds: float = doc("while a start-up phase (checks, shard hashing, engine build, resume, first batch) "
                                   "runs, a log line naming it every this many seconds (0: never)", 30.0)
    deepspeed_log_level: Literal["debug", "info", "warning", "error"] = doc(
        "DeepSpeed's own log messages shown from this level up (info: its start-up and per-step reports)", "warning")

    def check(self) -> None:
        need(self.log_every >= 1, "log_every", "must be at least 1")
        need(self.val_every >= 0, "val_every", "must be 0 (never) or more")
        need(self.val_batches >= 1, "val_batches", "must be at least 1")
        need(self.sample_every >= 0, "sample_every", "must be 0 (never) or more")
        need(self.sample_cfg > 0, "sample_cfg", "must be positive")
        need(self.heartbeat_seconds >= 0, "heartbeat_seconds", "must be 0 (never) or more")
        need(self.qa_every is None or self.qa_every >= 0, "qa_every", "must be 0 (never) or more")
        need(self.qa_samples >= 1, "qa_samples", "must be at least 1")
        need(self.qa_max_new_tokens >= 1, "qa_max_new_tokens", "must be at least 1")


@dataclass(kw_only=True)
class SystemConfig(Section):
    title: ClassVar[str] = "system"
    ds_config: str | None = doc("a ds_configs/ name or a JSON path; unset: zero3_bf16 on GPU, zero3_cpu on CPU",
                                None)
    frozen_weights: Literal["partitioned", "persisted"] = doc(
        "ZeRO-3's frozen parameters (SigLIP in Stages I-II, the LLM in Stage I, the VQ): partitioned (gathered "
        "in every micro-batch's forward and backward) or persisted (whole on every rank from their first use in "
        "a step until the optimizer step: one gather per step, none in backward; costs their full bf16 weights "
        "per GPU); ZeRO-1/2 keep every weight whole anyway", "partitioned")
    gpus_per_node: int = doc("GPUs per node, for the batch plan's advice (and --dry-run's nodes)", 8)
    watchdog_seconds: float = doc("exit 3 with every stack if no step completes in this long (0: off)", 1800.0)
    collective_timeout_seconds: float = doc("a collective (all-reduce, gather) waiting this long raises on its rank: "
                                            "below --watchdog-seconds, so a dead peer is named first", 1500.0)

    def check(self) -> None:
        need(self.gpus_per_node >= 1, "gpus_per_node", "must be at least 1")
        need(self.watchdog_seconds >= 0, "watchdog_seconds", "must be 0 (off) or more")
        need(0 < self.collective_timeout_seconds and (not self.watchdog_seconds
                                                       or self.collective_timeout_seconds < self.watchdog_seconds),
             "collective_timeout_seconds", f"must be positive and below --watchdog-seconds ({self.watchdog_seconds:g})")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optim": OptimConfig, "lora": LoraConfig,
            "checkpoint": CheckpointConfig, "logging": LoggingConfig, "system": SystemConfig}
# Sections added since runs were first saved: a config.yaml without one reads as that section's defaults.
ADDED = ("lora",)


@dataclass(kw_only=True)
class ClusterConfig(Section):
    """What --dry-run plans for: a question about a cluster, not a setting of the run, so never saved with it."""

    title: ClassVar[str] = "the cluster --dry-run plans for (not saved with the run)"
    world_size: int | None = doc("data-parallel size to plan for (or --nodes)", None)
    nodes: int | None = doc("nodes to plan for, of --gpus-per-node GPUs (unset: from --world-size)", None)
    gpu: Literal["a100-40g", "a100-80g", "h100", "h200"] = doc("the GPU to plan for", "a100-80g")
    nics_per_node: int | None = doc("network cards per node for the cross-node fabric (unset: the GPU type's "
                                    "typical node)", None)
    nic_gbps: float | None = doc("Gb/s per network card (unset: the GPU type's typical node)", None)
    nvlink_gbps: float | None = doc("NCCL bus bandwidth inside a node, Gb/s (unset: the GPU type's)", None)

    def check(self) -> None:
        need(self.world_size is None or self.world_size >= 1, "world_size", "must be at least 1")
        need(self.nodes is None or self.nodes >= 1, "nodes", "must be at least 1")
        need(self.nics_per_node is None or self.nics_per_node >= 1, "nics_per_node", "must be at least 1")
        for name in ("nic_gbps", "nvlink_gbps"):
            need(getattr(self, name) is None or getattr(self, name) > 0, name, "must be positive")


PARSED = {**SECTIONS, "cluster": ClusterConfig}  # every flag: the run's sections, then --dry-run's cluster
# Settings older runs saved that are no longer part of a run (--dry-run's cluster): dropped when such a run is read.
RETIRED = {"system": ("gpu", "nodes", "intra_node_gbps", "inter_node_gbps")}


@dataclass(kw_only=True)
class TrainConfig:
    stage: int
    model: ModelConfig
    data: DataConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig
    logging: LoggingConfig
    system: SystemConfig
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        need(self.stage in STAGES, "stage", f"{self.stage!r}: Janus-Pro has stages {', '.join(map(str, STAGES))}")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.as_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        def section(name: str) -> dict:
            saved = values.get(name, {}) if name in ADDED else values[name]
            return {k: v for k, v in saved.items() if k not in RETIRED.get(name, ())}

        return cls(stage=values["stage"], **{name: kind(**section(name)) for name, kind in SECTIONS.items()})

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A run's saved config.yaml."""
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))


def table2(stage: Stage) -> dict[str, Any]:
    """A Table 2 column as field values: model/stages.py's Stage names its fields as the config does."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(stage).items()}


# ---- where defaults come from: the model --init holds, Table 2 for its size ----

def resolved_init(init: str | None, download: bool = True) -> str | None:
    """--init as a local folder: a hub id becomes the path of its cached (or, online, downloaded) snapshot, which is
    what the run then records and every later reader (the engine, export, the next stage) opens.

    `download=False` (--help, --dry-run, --write-ds-config: they read no weights): a hub id not in the cache stays
    as it is, and `init_defaults` plans a known release from its preset, or says to give --model."""
    if not init or Path(init).exists() or not is_repo_id(init):
        return init
    if not download:
        cached = cached_snapshot(init)
        return str(cached) if cached else init
    try:
        return str(resolve_weights(init, "--init"))
    except HubError as error:
        raise ConfigError(str(error)) from None


def init_defaults(init: str | None) -> dict[str, str]:
    """What --init holds: the model and tokenizer of a previous stage's run, or released weights (their own
    config.json and tokenizer)."""
    if not init:
        return {}
    path = Path(init)
    if not path.exists() and is_repo_id(init):  # a hub id left unresolved: a plan, which reads no weights
        return {"model": RELEASE_PRESETS[init]} if init in RELEASE_PRESETS else {}
    if is_run_directory(path):
        previous = yaml.safe_load(config_file(path).read_text()).get("model")
        if not isinstance(previous, dict) or not previous.get("model"):
            raise ConfigError(f"--init {init}: its config.yaml was not written by this version's training")
        return {"model": previous["model"], "tokenizer": previous["tokenizer"]}
    if (path / "config.json").is_file():
        return {"model": str(path), "tokenizer": str(path)}
    if path.is_dir() and any(path.glob("*.safetensors")):  # bare weights: --model names their architecture
        return {"tokenizer": str(path)}
    raise ConfigError(f"--init {init}: neither a training run directory (config.yaml and checkpoints/) nor "
                      "weights (config.json, *.safetensors)" + ("" if path.exists() else
                                                                  "; it does not exist (a Hugging Face hub id is "
                                                                  "owner/name)"))


def read_model_config(spec: str) -> JanusConfig:
    """--model's config (a preset, or a checkpoint directory's config.json), as a ConfigError naming the flag."""
    try:
        return model_config(spec)
    except (ValueError, OSError) as error:
        raise ConfigError(f"--model {spec}: {error}") from None


def shape(config: JanusConfig) -> tuple:
    """What makes two model configs the same network."""
    t, v, q = config.text_config, config.vision_config, config.vq_config
    return (t.vocab_size, t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads,
            t.num_key_value_heads, v.hidden_size, v.num_hidden_layers, q.num_embeddings, q.embed_dim)


def chosen_model(model: str | None, held: str | None, init: str | None) -> tuple[str, JanusConfig] | None:
    """--model, else the model --init holds, with its config (read once); None when neither names one."""
    spec = model if model is not None else held
    if spec is None:
        return None
    config = read_model_config(spec)
    if model is not None and held is not None and model != held and shape(config) != shape(read_model_config(held)):
        raise ConfigError(f"--model {model}: --init {init} holds another model ({held}); drop --model")
    return spec, config


def chosen_stage(launcher: int | None, flag_value: int | None, from_file: Any, config_path: str | None) -> int:
    """The stage: the launcher's (stage1.py .. stage3.py), else --stage, else the --config file's `stage:`; where
    two are given they must agree (a YAML file written for Stage III must not silently train Stage II)."""
    given = {"the launcher": launcher, "--stage": flag_value, f"--config {config_path}": from_file}
    named = {who: value for who, value in given.items() if value is not None}
    if not named:
        raise ConfigError("--stage: give the stage to train, 1, 2 or 3 (janus-train --stage 2 --help lists its "
                          "flags)")
    if len(set(named.values())) > 1:
        raise ConfigError("--stage: " + ", ".join(f"{who} says {value!r}" for who, value in named.items())
                          + "; give one stage")
    stage = next(iter(named.values()))
    need(stage in STAGES, "stage", f"{stage!r}: Janus-Pro has stages {', '.join(map(str, STAGES))}")
    return stage


# ---- the command line ----

class Parser(HfArgumentParser):
    """HfArgumentParser (flags from the dataclasses, --x_y and --x-y both, help with defaults and choices),
    without prefix abbreviations, with "did you mean" and one-line errors."""

    def __init__(self, stage: int | None):
        prog = "janus-train" if stage is None else f"janus-train --stage {stage}"
        super().__init__(list(PARSED.values()), prog=prog, allow_abbrev=False,
                         usage="%(prog)s [--flag VALUE ...]   (flags by section below)",
                         description="Janus-Pro training on DeepSpeed ZeRO-3, one stage per run. Defaults: Table 2 "
                                     "(model/stages.py) for the stage and --model's size, then --config, then flags.")
        for action in self._actions:
            action.required = False  # Table 2 fields get their defaults from set_defaults
            action.option_strings.sort(key=lambda option: "_" in option)  # --learning-rate shown first
        self.add_argument("--stage", type=int, choices=sorted(STAGES),
                          help="the stage to train (set by launchers/stageN.py; janus-train needs it, or the "
                               "--config file's `stage:`)")
        self.add_argument("--config", help="YAML file of settings (sections as in OUTPUT/config.yaml, or flat); "
                                           "flags override it")
        self.add_argument("--epochs", type=float,
                          help="train this many passes over --data (0.5 and 3 both work) instead of --train-steps: "
                               "an epoch is every row of every source --ratio draws seen once, so the source slowest "
                               "to go through at its share of the mix sets it; its steps are printed at start")
        self.add_argument("--write-ds-config", metavar="PATH",
                          help="write the DeepSpeed JSON this run would use (for --world-size, else the launcher's "
                               "world) to PATH and exit, training nothing")
        self.add_argument("--dry-run", action="store_true",
                          help="print the batch plan, per-GPU memory and the performance plan for --world-size "
                               "(or --nodes x --gpus-per-node) on --gpu, build nothing")
        self.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's

    def _add_dataclass_arguments(self, dtype: type) -> None:
        group = self.add_argument_group(dtype.title)
        hints = typing.get_type_hints(dtype)
        for f in dataclasses.fields(dtype):
            f.type = hints[f.name]
            self._parse_dataclass_field(group, f)

    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(message + self._suggestion(message))

    def _suggestion(self, message: str) -> str:
        if "unrecognized arguments" not in message:
            return ""
        options = sorted(self._option_string_actions, key=lambda option: "_" in option)  # --x-y spellings first
        hints = []
        for word in message.split(":", 1)[1].split():
            if word.startswith("--"):
                name = word.split("=")[0]
                close = [o for o in options if o.startswith(name)] or difflib.get_close_matches(name, options, 1, 0.6)
                if close:
                    hints.append(f"{name}: did you mean {close[0]}?")
        return ("; " + "; ".join(hints)) if hints else "; see --help"


def yaml_values(path: str) -> dict[str, Any]:
    """A YAML file's settings, flat: sections (as in a run's config.yaml) or field names at the top level."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        loaded = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML ({error})") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings")
    values: dict[str, Any] = {}
    for key, value in loaded.items():
        if key in PARSED and isinstance(value, dict):
            values.update(value)
        else:
            values[key] = value
    hints = {name: hint for kind in PARSED.values() for name, hint in typing.get_type_hints(kind).items()
             if name != "title"} | {"stage": int, "epochs": int | float}
    unknown = sorted(set(values) - set(hints))
    if unknown:
        close = {u: difflib.get_close_matches(u, hints, 1) for u in unknown}
        raise ConfigError(f"--config {path}: unknown setting(s) " + ", ".join(
            u + (f" (did you mean {c[0]}?)" if c else "") for u, c in close.items()))
    for name, value in values.items():  # before argparse, which would convert a string default silently
        if not _matches(value, hints[name]):
            raise ConfigError(f"--config {path}: {name}: {value!r} is not {_type_name(hints[name])}")
    return values


# What the command line asks beyond the run's settings: not saved in config.yaml.
INVOCATION = ("stage", "config", "dry_run", "local_rank", "epochs", "write_ds_config")


def resolve(stage: int | None, argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    """Table 2 for the stage and the model's real size, then the YAML file, then the flags.

    `stage` is the launcher's; janus-train passes None and the stage comes from --stage or the YAML file. The
    returned namespace holds the invocation (--config, --dry-run), `cluster` (the ClusterConfig --dry-run plans
    for) and `model_config`, the model's JanusConfig: --init and the model config are read here once, and passed
    down from here."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = Parser(stage)
    helping = bool({"-h", "--help"} & set(argv))
    known, _ = parser.parse_known_args([a for a in argv if a not in ("-h", "--help")])  # what decides the defaults
    from_file = yaml_values(known.config) if known.config else {}
    stage = chosen_stage(stage, known.stage, from_file.pop("stage", None), known.config)
    planning = helping or known.dry_run or known.write_ds_config  # reads no weights
    init = resolved_init(flag_or(known, from_file, "init"), download=not planning)
    held = init_defaults(init)
    model = chosen_model(flag_or(known, from_file, "model"), held.get("model"), init)
    size = model_size(model[1]) if model else "1b"  # Table 2's column; --help needs no model
    parser.set_defaults(**{**table2(stage_for(stage, size)), "output": f"runs/stage{stage}", **from_file})
    values = vars(parser.parse_args(argv))
    args = argparse.Namespace(**{k: values.pop(k) for k in INVOCATION})
    if model is None:
        uncached = ""
        if init and is_repo_id(init):  # left unresolved by a plan (resolved_init)
            uncached = (f" (--init {init} is not in the Hugging Face cache, and a plan downloads no weights: give "
                        f"--model, or download it first with `{download_command(init)}`)")
        raise ConfigError(f"--model: give a preset ({', '.join(PRESETS)}) or a checkpoint directory, or --init "
                          f"weights whose config.json names the model{uncached}")
    values["model"], args.model_config = model
    values["init"] = init  # the hub id's local snapshot, resolved once above
    values["tokenizer"] = values["tokenizer"] or held.get("tokenizer")
    def section(kind: type) -> Section:
        return kind(**{f.name: values[f.name] for f in dataclasses.fields(kind)})

    sections = {name: section(kind) for name, kind in PARSED.items() if kind is not OptimConfig}
    values.update(run_length(stage_for(stage, size), values, given_names(parser, argv), set(from_file), args,
                             sections["data"]))
    sections["optim"] = section(OptimConfig)
    check_warmup(sections["optim"])
    check_lora(sections["lora"], sections["optim"].trainable, args.model_config)
    args.cluster = sections.pop("cluster")
    return TrainConfig(stage=stage, **sections), args


def given_names(parser: Parser, argv: list[str]) -> set[str]:
    """The settings argv sets: argparse fills a default only where the namespace lacks the name, so every name
    still holding the marker afterwards was not given."""
    unset = object()
    probe = argparse.Namespace(**{action.dest: unset for action in parser._actions})
    parser.parse_known_args(argv, namespace=probe)
    return {name for name, value in vars(probe).items() if value is not unset}


def run_length(table: Stage, values: dict, flags: set[str], in_file: set[str], args: argparse.Namespace,
               data: DataConfig) -> dict[str, int]:
    """--train-steps (from --epochs when given) and --warmup-steps (scaled to a fine-tune's length when unset);
    sets `args.epoch`, the data's epoch, when --epochs asked for it. A flag overrides the --config file's
    --epochs or --train-steps; the two given at the same level are refused."""
    steps, args.epoch = values["train_steps"], None
    if "train_steps" in flags and "epochs" not in flags:
        args.epochs = None
    if args.epochs is not None:
        need("train_steps" not in flags and ("train_steps" not in in_file or "epochs" in flags), "epochs",
             "give --epochs or --train-steps, not both")
        need(args.epochs > 0, "epochs", f"{args.epochs:g}: must be positive")
        try:
            args.epoch = epochs.epoch(data, values["rows_per_step"])
        except epochs.EpochError as error:
            raise ConfigError(str(error)) from None
        steps = epochs.steps_for(args.epochs, args.epoch)
    warmup = values["warmup_steps"]
    if not {"warmup_steps"} & (flags | in_file) and steps != table.train_steps:
        warmup = fine_tune_warmup(table.warmup_steps, steps)
    return {"train_steps": steps, "warmup_steps": warmup}


def flag_or(args: Any, from_file: dict, name: str) -> Any:
    value = getattr(args, name)
    return value if value is not None else from_file.get(name)
