"""The training CLI and config: Table 2 defaults by the real model size, one-line errors for every known user
mistake (before anything heavy), YAML type checks, --help that documents itself.

In-process tests here; the ones that start processes or take long are in tests/integration/test_config.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from model.config import preset_config
from pipeline.config import ConfigError, TrainConfig, resolve
from pipeline.monitor import wandb_run_id
from tests.support import corpus_flags, mistakes, run_to_resume


def run_dir_of(path: Path, model: str, tokenizer: str) -> Path:
    """A previous stage's run directory as training leaves it (config.yaml, checkpoints/)."""
    config, _ = resolve(1, ["--model", model, "--tokenizer", tokenizer, "--output", str(path)])
    path.mkdir(parents=True)
    config.save(path / "config.yaml")
    (path / "checkpoints").mkdir()
    return path


def weights_dir_of(path: Path, preset: str) -> Path:
    """Released weights as far as the config goes: a config.json of the preset's widths."""
    path.mkdir(parents=True)
    preset_config(preset).to_json_file(str(path / "config.json"))
    return path


def test_model_and_table2_column_follow_what_init_holds(tmp_path):
    run = run_dir_of(tmp_path / "stage2-run", "7b", "/tok")
    config, _ = resolve(3, ["--init", str(run)])
    assert config.model.model == "7b" and config.model.tokenizer == "/tok"  # not the tiny model, not "None"
    assert config.optim.train_steps == 40_000  # 7B's Stage III column
    released = weights_dir_of(tmp_path / "Janus-Pro-7B", "7b")
    config, _ = resolve(3, ["--model", str(released)])
    assert config.optim.train_steps == 40_000  # the size is read from the config, not the name's spelling
    assert resolve(3, ["--model", "1b"])[0].optim.train_steps == 80_000
    with pytest.raises(ConfigError, match="--model 1b: --init .* holds another model"):
        resolve(3, ["--model", "1b", "--init", str(released)])


def test_precedence_table2_then_yaml_then_flags_and_both_spellings(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump({"optim": {"learning_rate": 3e-4, "warmup_steps": 7}, "log_every": 3}))
    config, _ = resolve(2, ["--model", "tiny", "--config", str(file), "--warmup_steps", "9"])
    assert (config.optim.learning_rate, config.optim.warmup_steps, config.logging.log_every) == (3e-4, 9, 3)
    assert config.optim.rows_per_step == 512 and config.data.ratio == [2, 3, 5]  # Table 2, Stage II
    assert resolve(2, ["--model", "tiny", "--learning-rate", "2e-5"])[0].optim.learning_rate == 2e-5


def test_saved_config_reloads_equal(tmp_path):
    config, _ = resolve(2, ["--model", "tiny", "--data", "a", "b", "--ratio", "1", "0", "1"])
    config.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml") == config


@pytest.mark.parametrize(("values", "match"), [
    ({"warmup_steps": "100"}, "warmup_steps: '100' is not an integer"),
    ({"optim": {"lr_decay_style": "cosin"}}, "lr_decay_style: 'cosin' is not one of constant, linear, cosine"),
    ({"learning_rat": 1e-4}, "unknown setting.*learning_rat .did you mean learning_rate"),
    ({"ratio": [1, 2]}, "--ratio: three non-negative parts"),
])
def test_yaml_values_are_type_checked(tmp_path, values, match):
    file = tmp_path / "bad.yaml"
    file.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError, match=match):
        resolve(2, ["--model", "tiny", "--config", str(file)])


def test_wandb_ids_differ_for_runs_of_the_same_name(tmp_path):
    a, b = tmp_path / "x" / "runs" / "stage1", tmp_path / "y" / "runs" / "stage1"
    assert wandb_run_id(a) != wandb_run_id(b) and wandb_run_id(a).startswith("stage1-")
    assert wandb_run_id(a) == wandb_run_id(tmp_path / "x" / "runs" / ".." / "runs" / "stage1")


# ---- every known user mistake, as a user meets it: one `error:` line naming the flag, no traceback ----


def test_a_resumed_run_refuses_changed_settings_unless_allowed(tmp_path, shard_corpus, tokenizer_dir):
    from pipeline.preflight import check_resume_matches, manifest_digests
    from pipeline.run_dir import fingerprints_file

    flags = ["--model", "tiny", "--tokenizer", str(tokenizer_dir), *corpus_flags(shard_corpus), "--seq-len", "1400",
             "--output", str(tmp_path / "run")]
    run = run_to_resume(tmp_path / "run", 2, flags)
    check_resume_matches(resolve(2, [*flags, "--train-steps", "9", "--keep-last", "1"])[0])  # fine to change
    with pytest.raises(ConfigError, match=r"other settings: stage 2 -> 3; seq_len 1400 -> 1024; ratio .*"
                                          r"--allow-config-change stage seq_len ratio trainable to change"):
        check_resume_matches(resolve(3, [*flags, "--seq-len", "1024"])[0])
    check_resume_matches(resolve(3, [*flags, "--seq-len", "1024", "--allow-config-change", "stage", "seq_len",
                                     "trainable", "ratio"])[0])
    # The data is compared by content: the same manifests elsewhere pass, an edited one does not.
    digests = manifest_digests([str(shard_corpus[t]) for t in ("understanding", "text", "generation")])
    fingerprints_file(run).write_text(json.dumps({"manifests": digests}))
    moved = tmp_path / "moved-text"
    shutil.copytree(shard_corpus["text"], moved)
    elsewhere = [f if f != str(shard_corpus["text"]) else str(moved) for f in flags]
    check_resume_matches(resolve(2, elsewhere)[0])
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "rows_in": manifest["rows_in"]}, indent=4))
    with pytest.raises(ConfigError, match="other settings: data"):
        check_resume_matches(resolve(2, elsewhere)[0])


MISTAKES = ["abbreviation", "typo", "bad choice", "attention", "flash on cpu", "no model", "no tokenizer",
            "wrong tokenizer", "missing tokenizer", "no data", "mistyped data", "missing shards", "truncated shard",
            "ratio without data", "missing init", "missing resume", "impossible batch", "decay before warm-up",
            "bad ds config", "not trainable", "other tokenizer's shards", "other VQ's shards",
            "foreign checkpoint", "resume another stage", "collective timeout after the watchdog"]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_user_mistakes_stop_at_once_with_one_line(mistake, shard_corpus, tokenizer_dir, made, tmp_path, capsys):
    from pipeline.train import main

    flags, expected = mistakes(shard_corpus, tokenizer_dir, made, tmp_path)[mistake]
    with pytest.raises(SystemExit) as stopped:
        main(2, flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
