"""Fine-tuning settings: --epochs becomes --train-steps from the manifests' rows and tokens; a fine-tune's warm-up
scales with its length, and a warm-up that would outlast the run is refused; --write-ds-config writes the DeepSpeed
config the run would use."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from model.manifest import Manifest, write_shard
from model.sample import GENERATION, TEXT, UNDERSTANDING, Sample, samples_to_table
from model.stages import STAGES
from pipeline.config import WARMUP_SHARE, ConfigError, Parser, resolve
from pipeline.ds_config import batch_plan
from pipeline.engine import run_deepspeed_config
from pipeline.epochs import source_sizes
from pipeline.planning.dry_run import write_run_config


def manifest(root: Path, task: str, rows: int, length: int) -> Path:
    """A manifest of `rows` samples of `length` tokens each (generation: a 10-token prompt and its image ids)."""
    root.mkdir(parents=True)
    if task == GENERATION:
        samples = [Sample(task, [1] * 10, image_ids=[2] * (length - 10), key=str(i)) for i in range(rows)]
    else:
        samples = [Sample(task, [1] * length, loss_spans=[(0, length)], key=str(i)) for i in range(rows)]
    shard = write_shard(samples_to_table(samples), root / "shard-0.arrow")
    Manifest(task=task, tokenizer_fingerprint="t", shards=[shard], rows_in=rows, rows_written=rows).write(root)
    return root


def test_an_epoch_is_set_by_the_source_slowest_to_go_through_at_its_share(tmp_path):
    und = manifest(tmp_path / "und", UNDERSTANDING, rows=40, length=100)
    gen = manifest(tmp_path / "gen", GENERATION, rows=10, length=300)
    flags = ["--model", "tiny", "--data", str(und), str(gen), "--seq-len", "1000", "--rows-per-step", "2"]
    # 1:1 in samples: a drawn sample averages 200 tokens, so a 2,000-token step draws 5 of each; gen's 10 rows
    # take 2 steps, und's 40 take 8: und sets the epoch.
    config, args = resolve(2, [*flags, "--ratio", "1", "0", "1", "--epochs", "3"])
    assert args.epoch.steps == pytest.approx(8) and args.epoch.slowest.manifest == str(und)
    assert config.optim.train_steps == 24
    assert args.epoch.line().startswith("1 epoch = 8 steps")
    # In tokens, 1:3: und gets 500 tokens a step (4,000 in all: 8 steps), gen 1,500 (3,000 in all: 2 steps).
    config, args = resolve(2, [*flags, "--ratio", "1", "0", "3", "--ratio-unit", "tokens", "--epochs", "0.5"])
    assert args.epoch.steps == pytest.approx(8) and config.optim.train_steps == 4
    # A weight within a task slows the other source of that task down.
    more = manifest(tmp_path / "und2", UNDERSTANDING, rows=40, length=100)
    config, args = resolve(2, [*flags[:5], str(more), *flags[5:], "--data-weights", "1", "1", "3",
                               "--ratio", "1", "0", "1", "--epochs", "1"])
    # und sources get 1/4 and 3/4 of und's 5 samples a step: the first takes 40 / 1.25 = 32 steps.
    assert args.epoch.steps == pytest.approx(32) and args.epoch.slowest.manifest == str(und)


def test_tokens_count_a_generation_samples_image_and_a_source_the_ratio_skips_is_not_waited_for(tmp_path):
    gen = manifest(tmp_path / "gen", GENERATION, rows=4, length=600)
    text = manifest(tmp_path / "text", TEXT, rows=1000, length=10)
    config, args = resolve(2, ["--model", "tiny", "--data", str(gen), str(text), "--ratio", "0", "0", "1",
                               "--seq-len", "1200", "--rows-per-step", "1", "--epochs", "1"])
    assert [s.tokens for s in source_sizes(config.data)] == [2400, 10_000]
    assert args.epoch.steps == pytest.approx(2) and config.optim.train_steps == 2  # text's 1,000 rows never drawn


def test_epochs_and_train_steps_together_are_refused(tmp_path):
    und = manifest(tmp_path / "und", UNDERSTANDING, rows=8, length=100)
    flags = ["--model", "tiny", "--data", str(und), "--ratio", "1", "0", "0"]
    with pytest.raises(ConfigError, match="give --epochs or --train-steps, not both"):
        resolve(2, [*flags, "--epochs", "2", "--train-steps", "100"])
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({"epochs": 2, "train_steps": 100}))
    with pytest.raises(ConfigError, match="not both"):
        resolve(2, [*flags, "--config", str(file)])
    # A flag overrides the file's choice of the two.
    assert resolve(2, [*flags, "--config", str(file), "--train-steps", "7"])[0].optim.train_steps == 7
    assert resolve(2, [*flags, "--config", str(file), "--epochs", "1"])[1].epochs == 1
    with pytest.raises(ConfigError, match="--epochs: 0: must be positive"):
        resolve(2, [*flags, "--epochs", "0"])


def test_epochs_of_an_empty_source_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    Manifest(task=UNDERSTANDING, tokenizer_fingerprint="t").write(empty)
    with pytest.raises(ConfigError, match="hold no rows"):
        resolve(2, ["--model", "tiny", "--data", str(empty), "--ratio", "1", "0", "0", "--epochs", "1"])
    with pytest.raises(ConfigError, match="--data .*nope: cannot count its rows"):
        resolve(2, ["--model", "tiny", "--data", str(tmp_path / "nope"), "--ratio", "1", "0", "0", "--epochs", "1"])


def test_a_fine_tunes_warmup_scales_with_its_length_and_table_2_keeps_its_own():
    for stage, table in STAGES.items():
        assert resolve(stage, ["--model", "1b"])[0].optim.warmup_steps == table.warmup_steps
    config = resolve(2, ["--model", "tiny", "--train-steps", "1000"])[0].optim
    assert config.warmup_steps == round(WARMUP_SHARE * 1000) == 30
    assert resolve(2, ["--model", "tiny", "--train-steps", "10"])[0].optim.warmup_steps == 1  # at least 1
    assert resolve(2, ["--model", "tiny", "--train-steps", "1"])[0].optim.warmup_steps == 0  # but below the run
    # Never longer than Table 2's: a run longer than the stage's keeps 600, Stage III keeps none.
    assert resolve(1, ["--model", "tiny", "--train-steps", "100000"])[0].optim.warmup_steps == 600
    assert resolve(3, ["--model", "tiny", "--train-steps", "1000"])[0].optim.warmup_steps == 0
    assert resolve(2, ["--model", "tiny", "--train-steps", "1000", "--warmup-steps", "0"])[0].optim.warmup_steps == 0


def test_a_warmup_as_long_as_the_run_is_refused_naming_both(tmp_path):
    with pytest.raises(ConfigError, match=r"^--warmup-steps: 1000 is not below --train-steps 1000: .*give "
                                          r"--warmup-steps below 1000 \(e\.g\. 30\) or more --train-steps$"):
        resolve(2, ["--model", "tiny", "--train-steps", "1000", "--warmup-steps", "1000"])
    file = tmp_path / "short.yaml"  # a YAML file's warm-up is as given as a flag's
    file.write_text(yaml.safe_dump({"optim": {"warmup_steps": 5000}}))
    with pytest.raises(ConfigError, match="5000 is not below --train-steps 1000"):
        resolve(2, ["--model", "tiny", "--config", str(file), "--train-steps", "1000"])
    just_below = resolve(2, ["--model", "tiny", "--train-steps", "1000", "--warmup-steps", "999"])[0]
    assert just_below.optim.warmup_steps == 999


@pytest.mark.parametrize("flags, world, micro_batches", [
    (["--model", "1b", "--world-size", "8", "--rows-per-step", "64", "--rows-per-micro-batch", "2"], 8, 4),
    (["--model", "tiny", "--ds-config", "zero3_offload", "--rows-per-step", "16"], 1, 16),  # WORLD_SIZE unset
])
def test_write_ds_config_writes_what_the_run_would_use(tmp_path, monkeypatch, flags, world, micro_batches):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    path = tmp_path / "configs" / "ds.json"
    config, args = resolve(2, [*flags, "--write-ds-config", str(path)])
    line = write_run_config(config, args)
    written = json.loads(path.read_text())
    plan = batch_plan(config.optim.rows_per_step, world, config.data.rows_per_micro_batch)
    assert written == run_deepspeed_config(config, plan, args.model_config)
    assert (written["train_batch_size"], written["gradient_accumulation_steps"]) == (
        config.optim.rows_per_step, micro_batches)
    assert written["optimizer"]["params"]["lr"] == config.optim.learning_rate
    assert line.startswith(f"wrote {path} for {world} rank(s)")
    assert args.write_ds_config not in json.dumps(config.as_dict())  # an invocation, not a setting of the run


def test_write_ds_config_takes_the_launchers_world_and_refuses_an_impossible_batch(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    path = tmp_path / "ds.json"
    config, args = resolve(2, ["--model", "tiny", "--rows-per-step", "8", "--write-ds-config", str(path)])
    write_run_config(config, args)
    assert json.loads(path.read_text())["gradient_accumulation_steps"] == 2
    config, args = resolve(2, ["--model", "tiny", "--rows-per-step", "6", "--write-ds-config", str(path)])
    with pytest.raises(ConfigError, match="--rows-per-step 6: 6 rows per step do not split evenly over 4 ranks"):
        write_run_config(config, args)
    config, args = resolve(2, ["--model", "tiny", "--rows-per-step", "8", "--ds-config", "zero3_gpu",
                               "--write-ds-config", str(path)])
    with pytest.raises(ConfigError, match="--ds-config zero3_gpu: neither a JSON file"):
        write_run_config(config, args)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    config, args = resolve(2, ["--model", "tiny", "--rows-per-step", "8", "--write-ds-config", str(blocked / "x")])
    with pytest.raises(ConfigError, match=f"--write-ds-config {blocked / 'x'}: "):
        write_run_config(config, args)


def test_help_shows_the_new_flags():
    text = Parser(2).format_help()  # argparse %-formats help strings: a bare % in one breaks --help
    assert "0.03 x --train-steps rounded" in text and "--epochs" in text and "--write-ds-config PATH" in text
