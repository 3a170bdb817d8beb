"""Everything a run needs, checked in seconds before any rank waits on another or a model is built.

Each check raises ConfigError naming the flag and the fix: a mistyped path or a wrong tokenizer stops the run
at start, not after the engine is built or hours in when a shard is first sampled.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from model.manifest import MANIFEST_NAME, Manifest, file_sha256, tokenizer_fingerprint, weights_fingerprint
from model.sample import TASKS
from model.tokenizer import load_tokenizer
from model.vq import load_vq
from pipeline import checkpoint
from pipeline.config import (
    RESUME_GUARDED,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    TrainConfig,
    flag,
)
from pipeline.ds_config import BatchPlan, batch_plan, template_path
from pipeline.run_dir import config_file, fingerprints_file, is_run_directory, run_of_checkpoint


@dataclass(frozen=True)
class Checked:
    tokenizer: PreTrainedTokenizerBase
    plan: BatchPlan


def preflight(config: TrainConfig, world_size: int) -> Checked:
    tokenizer = checked_tokenizer(config.model.tokenizer, config.model.init)
    if not config.data.data:
        raise ConfigError("--data: at least one manifest is needed (a preprocess output directory)")
    check_init(config.model.init, config.checkpoint.trust_checkpoint)
    fingerprints = {"tokenizer": tokenizer_fingerprint(tokenizer), "VQ": init_vq_fingerprint(config.model.init)}
    check_manifests("data", config.data, fingerprints)
    check_manifests("val_data", config.data, fingerprints)
    check_resume(config.checkpoint)
    check_resume_matches(config)
    check_attention(config.model.attention)
    check_ds_config(config.system.ds_config)
    return Checked(tokenizer, checked_plan(config, world_size))


def checked_tokenizer(path: str | None, init: str | None) -> PreTrainedTokenizerBase:
    """A local tokenizer directory with the Janus special tokens (never a hub lookup that retries for minutes)."""
    if path is None:
        raise ConfigError("--tokenizer: needed (a tokenizer directory), or --init weights that hold one")
    directory = Path(path)
    if not directory.is_dir():
        raise ConfigError(f"--tokenizer {path}: no such directory")
    if not any((directory / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
        whose = " (the default: --init's)" if path == init else ""
        raise ConfigError(f"--tokenizer {path}{whose}: holds no tokenizer.json or tokenizer_config.json; pass the "
                          "tokenizer directory with --tokenizer")
    try:
        return load_tokenizer(directory)
    except Exception as error:  # any loader failure is the same user error: name the flag, not the stack
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise ConfigError(f"--tokenizer {path}: cannot load it as a Janus tokenizer: {reason}") from None


def init_vq_fingerprint(init: str | None) -> str | None:
    """The fingerprint of the VQ the run will hold: --init's own, or the one the run it names recorded; None
    when unknown (random weights, bare weights without a config, a run from before fingerprints were kept)."""
    if not init:
        return None
    if is_run_directory(init):
        recorded = fingerprints_file(init)
        return json.loads(recorded.read_text()).get("vq_fingerprint") if recorded.is_file() else None
    if not (Path(init) / "config.json").is_file():
        return None
    try:
        return weights_fingerprint(load_vq(init))
    except (OSError, ValueError) as error:
        raise ConfigError(f"--init {init}: cannot read its VQ ({error})") from None


def check_manifests(name: str, data: DataConfig, fingerprints: dict[str, str | None]) -> None:
    """Each manifest exists and reads, its shards are all there, and it was made with this tokenizer and VQ; the
    ratio asks only for tasks some training manifest holds."""
    tasks = set()
    for path in getattr(data, name):
        where = f"{flag(name)} {path}"
        if not Path(path).exists():
            raise ConfigError(f"{where}: no such file or directory")
        try:
            manifest = Manifest.read(path)
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ConfigError(f"{where}: not a readable manifest.json ({error}); point it at a preprocess "
                              "output directory") from None
        root = Path(path) if Path(path).is_dir() else Path(path).parent
        wrong = manifest.size_problems(root)
        if wrong:
            raise ConfigError(f"{where}: {len(wrong)} shard(s) missing or not of their recorded size, e.g. "
                              f"{wrong[0]}; rerun preprocessing into that directory to redo them")
        made_with = {"tokenizer": manifest.tokenizer_fingerprint, "VQ": manifest.vq_fingerprint}
        for what, theirs in made_with.items():
            ours = fingerprints[what]
            if theirs and ours and theirs != ours and not data.allow_fingerprint_mismatch:
                whose = "--tokenizer's" if what == "tokenizer" else "--init's"
                raise ConfigError(f"{where}: made with another {what} (fingerprint {theirs[:12]}, {whose} is "
                                  f"{ours[:12]}); preprocess again with this {what}, or pass "
                                  "--allow-fingerprint-mismatch if you know they agree")
        tasks.add(manifest.task)
    if name == "data":
        wanted = [t for t, r in zip(TASKS, data.ratio, strict=True) if r > 0 and t not in tasks]
        if wanted:
            raise ConfigError(f"--ratio {' '.join(map(str, data.ratio))} asks for {', '.join(wanted)} data but no "
                              f"--data manifest holds it; add one or set its part of --ratio to 0")


def check_init(init: str | None, trust: bool) -> None:
    if init and is_run_directory(init):
        latest = checkpoint.latest_checkpoint(init)
        if latest is None:
            raise ConfigError(f"--init {init}: a run directory without a complete checkpoint to start from")
        check_ours("init", latest, trust)


def check_resume(config: CheckpointConfig) -> None:
    if config.resume == "auto":
        for path in checkpoint.complete_checkpoints(config.output):
            check_ours("resume auto", path, config.trust_checkpoint)
    elif config.resume != "none":
        if not (Path(config.resume) / checkpoint.COMPLETE).is_file():
            raise ConfigError(f"--resume {config.resume}: not a complete checkpoint directory (auto, none, or "
                              "OUTPUT/checkpoints/step-N)")
        check_ours("resume", Path(config.resume), config.trust_checkpoint)


def manifest_digests(manifests: list[str]) -> list[str]:
    """What the data is, not where it lies: each manifest file's sha256, in order."""
    return [file_sha256(Path(m) / MANIFEST_NAME if Path(m).is_dir() else Path(m)) for m in manifests]


def resumed_run(config: CheckpointConfig) -> Path | None:
    """The run directory whose checkpoint this run will continue, if any."""
    if config.resume == "auto":
        return Path(config.output) if checkpoint.complete_checkpoints(config.output) else None
    if config.resume == "none":
        return None
    run = run_of_checkpoint(config.resume)
    return run if config_file(run).is_file() else None


def check_resume_matches(config: TrainConfig) -> None:
    """A resumed run trains what it trained before: settings that change that differ only by --allow-config-change."""
    run = resumed_run(config.checkpoint)
    if run is None or not config_file(run).is_file():
        return
    try:
        before = TrainConfig.load(config_file(run)).as_dict()
    except (OSError, TypeError, KeyError, ValueError) as error:
        raise ConfigError(f"--resume {config.checkpoint.resume}: cannot read {config_file(run)} ({error}); resume "
                          "with the version that wrote it, or start a new --output") from None
    now = config.as_dict()
    recorded = fingerprints_file(run)
    changed = []
    for name, where in RESUME_GUARDED.items():
        if name in config.checkpoint.allow_config_change:
            continue
        old, new = lookup(before, where), lookup(now, where)
        if name == "data" and recorded.is_file():  # the same manifests by content, wherever they now lie
            old, new = json.loads(recorded.read_text()).get("manifests", old), manifest_digests(new)
        if isinstance(old, dict) and isinstance(new, dict):  # a whole section (lora): only the fields that differ
            fields = [k for k in new if old.get(k) != new[k]]
            old, new = ({k: values.get(k) for k in fields} for values in (old, new))
        if old != new:
            changed.append(f"{name} {old} -> {new}")
    if changed:
        raise ConfigError(f"--resume {config.checkpoint.resume}: {run} was trained with other settings: "
                          f"{'; '.join(changed)}. Resume with the same ones, start a new --output, or pass "
                          f"--allow-config-change {' '.join(c.split()[0] for c in changed)} to change them on purpose")


def lookup(values: dict, where: str) -> object:
    for key in where.split("."):
        values = values[key]
    return values


def check_ours(name: str, path: Path, trust: bool) -> None:
    """Load only checkpoints this code wrote (every file listed, so each is verified), or what the user trusts
    unverified; either way their files are read as data only (pipeline/safe_load.py)."""
    if not trust and not checkpoint.written_here(path):
        raise ConfigError(f"--{name}: {path} was not written by this project's training (its "
                          f"{checkpoint.COMPLETE} lists no files), so its files cannot be verified; pass "
                          "--trust-checkpoint only if you trust where it came from")


def check_attention(attention: str) -> None:
    if attention == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("--attention flash_attention_2: flash-attn is not installed "
                          "(pip install flash-attn --no-build-isolation), or use --attention varlen")
    if attention in ("flash_attention_2", "varlen") and not torch.cuda.is_available():
        raise ConfigError(f"--attention {attention}: needs a CUDA GPU; use --attention sdpa on the CPU")


def check_ds_config(name: str | None) -> None:
    if name is not None:
        try:
            template_path(name)
        except FileNotFoundError as error:
            raise ConfigError(f"--ds-config {error}") from None


def checked_plan(config: TrainConfig, world_size: int) -> BatchPlan:
    try:
        return batch_plan(config.optim.rows_per_step, world_size, config.data.rows_per_micro_batch,
                          config.system.gpus_per_node)
    except ValueError as error:
        raise ConfigError(f"--rows-per-step {config.optim.rows_per_step}: {error}") from None
