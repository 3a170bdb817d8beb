"""The training CLI and config: Table 2 defaults by the real model size, one-line errors for every known user
mistake (before anything heavy), YAML type checks, --help that documents itself."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from model.config import preset_config
from pipeline.config import ConfigError, TrainConfig, resolve
from pipeline.monitor import wandb_run_id
from tests.support import REPO

LAUNCHER = str(Path(REPO) / "launchers" / "stage{}.py")


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

def corpus_flags(corpus: dict[str, Path]) -> list[str]:
    return ["--data", *(str(corpus[t]) for t in ("understanding", "text", "generation"))]


def run_to_resume(path: Path, stage: int, flags: list[str]) -> Path:
    """A run directory as training leaves it: its config.yaml and a complete checkpoint this code wrote."""
    from tests.support import fake_checkpoint

    config, _ = resolve(stage, [*flags, "--output", str(path)])
    fake_checkpoint(path, 2, {"rank-0.pt": b"state"})
    config.save(path / "config.yaml")
    return path


def test_a_resumed_run_refuses_changed_settings_unless_allowed(tmp_path, shard_corpus, tokenizer_dir):
    from pipeline.preflight import FINGERPRINTS, check_resume_matches, manifest_digests

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
    (run / FINGERPRINTS).write_text(json.dumps({"manifests": digests}))
    moved = tmp_path / "moved-text"
    shutil.copytree(shard_corpus["text"], moved)
    elsewhere = [f if f != str(shard_corpus["text"]) else str(moved) for f in flags]
    check_resume_matches(resolve(2, elsewhere)[0])
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "rows_in": manifest["rows_in"]}, indent=4))
    with pytest.raises(ConfigError, match="other settings: data"):
        check_resume_matches(resolve(2, elsewhere)[0])


@pytest.fixture(scope="module")
def made(tmp_path_factory, shard_corpus, tiny_model) -> dict[str, Path]:
    """Inputs that are wrong in one way each, and tiny weights with a VQ to check manifests against."""
    from model.weights import save_checkpoint

    root = tmp_path_factory.mktemp("mistakes")
    out = {"init": root / "init", "torn": root / "torn", "other-tok": root / "other-tok", "foreign": root / "foreign"}
    step = out["foreign"] / "checkpoints" / "step-00000002"
    step.mkdir(parents=True)  # a run directory whose checkpoint this code did not write (nothing says its files)
    (step / "COMPLETE").write_text(json.dumps({"step": 2, "world_size": 1}))
    out["stage1-run"] = run_to_resume(root / "stage1-run", 1, [*corpus_flags(shard_corpus), "--model", "tiny"])
    save_checkpoint(tiny_model, out["init"], "transformers")
    out["torn"].mkdir()  # a manifest whose shards are not there
    shutil.copy(shard_corpus["text"] / "manifest.json", out["torn"])
    out["truncated"] = root / "truncated"  # a shard cut short after its manifest was written
    shutil.copytree(shard_corpus["text"], out["truncated"])
    first = json.loads((out["truncated"] / "manifest.json").read_text())["shards"][0]["file"]
    with open(out["truncated"] / first, "r+b") as shard:
        shard.truncate(shard.seek(0, 2) - 100)
    out["other-tok"].mkdir()  # a tokenizer directory that does not hold a Janus tokenizer
    (out["other-tok"] / "tokenizer_config.json").write_text("{}")
    for name, field, value in (("retokenized", "tokenizer_fingerprint", "ab" * 32), ("other-vq", "vq_fingerprint",
                                                                                      "cd" * 32)):
        out[name] = root / name  # generation shards as made with another tokenizer or VQ
        shutil.copytree(shard_corpus["generation"], out[name])
        manifest = json.loads((out[name] / "manifest.json").read_text())
        (out[name] / "manifest.json").write_text(json.dumps({**manifest, field: value}))
    return out


def mistakes(corpus: dict[str, Path], tokenizer_dir: Path, made: dict[str, Path], tmp: Path
             ) -> dict[str, tuple[list[str], str]]:
    """name -> (stage 2 flags, text the error line must hold)."""
    data = corpus_flags(corpus)
    ok = ["--model", "tiny", "--tokenizer", str(tokenizer_dir), *data, "--output", str(tmp / "run")]
    other_tokenizer, torn = made["other-tok"], made["torn"]
    return {
        "abbreviation": ([*ok, "--learn", "1e-3"], "--learn: did you mean --learning-rate?"),
        "typo": ([*ok, "--warmup-step", "5"], "did you mean --warmup-steps"),
        "bad choice": ([*ok, "--lr-decay-style", "cosin"], "--lr-decay-style"),
        "attention": ([*ok, "--attention", "flash"], "--attention"),
        "flash on cpu": ([*ok, "--attention", "varlen"], "--attention varlen: needs a CUDA GPU"),
        "no model": (["--tokenizer", str(tokenizer_dir), *data], "--model: give a preset"),
        "no tokenizer": (["--model", "tiny", *data], "--tokenizer: needed"),
        "wrong tokenizer": ([*ok, "--tokenizer", str(other_tokenizer)], f"--tokenizer {other_tokenizer}: cannot"),
        "missing tokenizer": ([*ok, "--tokenizer", str(tmp / "nope")], "no such directory"),
        "no data": (ok[:4], "--data: at least one manifest"),
        "mistyped data": ([*ok, "--data", str(tmp / "shards" / "und")], "--data " + str(tmp / "shards" / "und")),
        "missing shards": ([*ok, "--data", str(corpus["understanding"]), str(corpus["generation"]), str(torn),
                            "--ratio", "1", "1", "1"], "shard(s) missing or not of their recorded size, e.g. "),
        "truncated shard": ([*ok, "--data", str(corpus["understanding"]), str(corpus["generation"]),
                             str(made["truncated"])], "bytes, not "),
        "ratio without data": ([*ok, "--data", str(corpus["understanding"])], "asks for text, generation data"),
        "missing init": ([*ok, "--init", str(tmp / "runs" / "stage1")], "--init"),
        "missing resume": ([*ok, "--resume", str(tmp / "step-7")], "--resume"),
        "impossible batch": ([*ok, "--rows-per-step", "3", "--rows-per-micro-batch", "2"], "--rows-per-step 3"),
        "decay before warm-up": ([*ok, "--warmup-steps", "10", "--lr-decay-steps", "5"], "--lr-decay-steps"),
        "bad ds config": ([*ok, "--ds-config", "zero3_gpu"], "--ds-config zero3_gpu: neither a JSON file"),
        "not trainable": ([*ok, "--trainable", "llm", "gen_encoder"], "--trainable: cannot train ['gen_encoder']"),
        "other tokenizer's shards": ([*ok, "--data", str(corpus["understanding"]), str(corpus["text"]),
                                      str(made["retokenized"])], "made with another tokenizer"),
        "resume another stage": ([*ok, "--output", str(made["stage1-run"])], "was trained with other settings: "
                                 "stage 1 -> 2"),
        "collective timeout after the watchdog": ([*ok, "--collective-timeout-seconds", "3600"],
                                                  "--collective-timeout-seconds: must be positive and below"),
        "foreign checkpoint": ([*ok, "--output", str(made["foreign"])], "--resume auto: " + str(made["foreign"])),
        "other VQ's shards": ([*ok, "--init", str(made["init"]), "--data", str(corpus["understanding"]),
                               str(corpus["text"]), str(made["other-vq"])], "made with another VQ"),
    }


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


@pytest.mark.integration
def test_a_mistake_from_the_command_line_has_no_traceback(shard_corpus, tokenizer_dir, made, tmp_path):
    flags, expected = mistakes(shard_corpus, tokenizer_dir, made, tmp_path)["mistyped data"]
    done = subprocess.run([sys.executable, LAUNCHER.format(2), *flags], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr


@pytest.mark.integration
def test_help_documents_every_field_with_its_default_and_choices():
    import dataclasses

    from pipeline.config import SECTIONS

    done = subprocess.run([sys.executable, LAUNCHER.format(2), "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu", "COLUMNS": "400"})
    assert done.returncode == 0, done.stderr
    entries: dict[str, str] = {}  # option -> its help entry, continuation lines joined
    for line in done.stdout.splitlines():
        if line.startswith("  -"):
            option = line.split()[0]
            entries[option] = line
        elif line.startswith("    ") and entries:
            entries[option] += " " + line.strip()
    for kind in SECTIONS.values():
        for f in dataclasses.fields(kind):
            entry = " ".join(entries["--" + f.name.replace("_", "-")].split())
            assert " ".join(f.metadata["help"].split()) in entry and "(default: " in entry, entry
    assert "{constant,linear,cosine}" in done.stdout and "(default: 270000)" in done.stdout  # Table 2, Stage II


@pytest.mark.integration
def test_without_a_launcher_a_script_runs_as_one_rank(shard_corpus, tokenizer_dir, tmp_path):
    """`python launchers/stage1.py ...` with no launcher environment: one rank, not DeepSpeed's MPI discovery."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, LAUNCHER.format(1), "--model", "tiny", "--tokenizer", str(tokenizer_dir),
                           "--data", str(shard_corpus["understanding"]), str(shard_corpus["generation"]),
                           "--train-steps", "1", "--rows-per-step", "1", "--seq-len", "1400", "--sample-every", "0",
                           "--num-workers", "1", "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Stage 1, 1 ranks" in done.stdout and (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()


def test_sdpa_over_a_flat_multi_row_micro_batch_is_refused_on_a_gpu():
    """sdpa would compute a flat micro-batch's whole attention square; the check runs with CUDA said present."""
    from pipeline.preflight import check_flat_sdpa

    def config(*flags: str) -> TrainConfig:
        return resolve(2, ["--model", "tiny", *flags])[0]

    with pytest.raises(ConfigError, match="--attention sdpa with --rows-per-micro-batch 2: .* use --attention varlen"):
        check_flat_sdpa(config("--rows-per-micro-batch", "2"), cuda=True)
    check_flat_sdpa(config("--rows-per-micro-batch", "2", "--pad-rows", "true"), cuda=True)  # fixed rows: fine
    check_flat_sdpa(config("--rows-per-micro-batch", "2"), cuda=False)  # the CPU: tests and small runs
    check_flat_sdpa(config("--rows-per-micro-batch", "1"), cuda=True)
