"""Start-up resolves the run once: the stage is a validated field from one place, --init and the model config are
read once, and a run directory's names have one owner."""

from __future__ import annotations

import pytest
import yaml

from model.config import preset_config
from pipeline import config as config_module
from pipeline import run_dir
from pipeline.config import ConfigError, TrainConfig, resolve


def test_janus_train_takes_the_stage_from_the_flag_or_the_yaml_file(tmp_path):
    assert resolve(None, ["--stage", "3", "--model", "7b"])[0].optim.train_steps == 40_000
    file = tmp_path / "stage3.yaml"
    file.write_text(yaml.safe_dump({"stage": 3, "model": "1b"}))
    config, _ = resolve(None, ["--config", str(file)])
    assert (config.stage, config.optim.train_steps) == (3, 80_000)  # Table 2 of Stage III, not dropped
    assert resolve(None, ["--config", str(file), "--stage", "3"])[0].stage == 3  # agreeing twice is fine


@pytest.mark.parametrize("launcher, argv, message", [
    (2, ["--config", "{file}"], "the launcher says 2, --config .* says 3"),  # a Stage III file on stage2.py
    (2, ["--stage", "3", "--model", "tiny"], "the launcher says 2, --stage says 3"),
    (None, ["--model", "tiny"], "give the stage to train"),
    (None, ["--stage", "4", "--model", "tiny"], "invalid choice: 4"),
])
def test_a_missing_or_contradicting_stage_is_refused(tmp_path, launcher, argv, message):
    file = tmp_path / "stage3.yaml"
    file.write_text(yaml.safe_dump({"stage": 3, "model": "tiny"}))
    with pytest.raises(ConfigError, match=message):
        resolve(launcher, [a.replace("{file}", str(file)) for a in argv])


def test_a_saved_config_with_an_unknown_stage_is_refused(tmp_path):
    values = resolve(2, ["--model", "tiny"])[0].as_dict()
    with pytest.raises(ConfigError, match="--stage: 7"):
        TrainConfig.from_dict({**values, "stage": 7})


def test_init_and_the_model_config_are_read_once(tmp_path, monkeypatch):
    released = tmp_path / "Janus-Pro-1B"
    released.mkdir()
    preset_config("1b").to_json_file(str(released / "config.json"))
    calls = {"init": 0, "model": 0}

    def counted(name, real):
        def call(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(config_module, "init_defaults", counted("init", config_module.init_defaults))
    monkeypatch.setattr(config_module, "model_config", counted("model", config_module.model_config))
    config, args = resolve(3, ["--init", str(released)])
    assert calls == {"init": 1, "model": 1}
    assert config.model.model == str(released) and args.model_config.text_config.hidden_size == 2048


def test_a_run_directory_is_found_by_its_names(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not run_dir.is_run_directory(run)
    resolve(2, ["--model", "tiny"])[0].save(run_dir.config_file(run))
    assert not run_dir.is_run_directory(run)  # released weights have no checkpoints/
    run_dir.checkpoints_dir(run).mkdir()
    assert run_dir.is_run_directory(run)
    # The on-disk format every earlier run was written in: renaming breaks their resume and export.
    assert (run / "config.yaml").is_file() and (run / "checkpoints").is_dir()
    assert run_dir.run_of_checkpoint(run_dir.checkpoints_dir(run) / "step-00000002") == run.resolve()


def test_the_dry_runs_cluster_is_not_saved_with_the_run(tmp_path):
    config, args = resolve(2, ["--model", "tiny", "--nodes", "4", "--gpu", "h100", "--nic-gbps", "400"])
    assert (args.cluster.nodes, args.cluster.gpu, args.cluster.nic_gbps) == (4, "h100", 400.0)
    config.save(tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    flat = {key for section in saved.values() if isinstance(section, dict) for key in section}
    assert not flat & {"gpu", "nodes", "world_size", "nics_per_node", "nic_gbps", "nvlink_gbps"}, flat


def test_a_run_saved_with_the_retired_cluster_settings_still_loads(tmp_path):
    values = resolve(2, ["--model", "tiny"])[0].as_dict()
    values["system"].update(gpu="a100-80g", nodes=None, intra_node_gbps=2400.0, inter_node_gbps=200.0)  # before
    loaded = TrainConfig.from_dict(values)
    assert loaded.as_dict() == resolve(2, ["--model", "tiny"])[0].as_dict()
    values["system"]["not_a_setting"] = 1  # anything else is still refused
    with pytest.raises(TypeError):
        TrainConfig.from_dict(values)


def test_the_dry_run_costs_the_config_start_up_read(monkeypatch):
    from pipeline.planning import dry_run, memory

    config, args = resolve(2, ["--model", "tiny", "--world-size", "8"])

    def read_again(*_args, **_kwargs):
        raise AssertionError("the dry run read the model config again")

    monkeypatch.setattr(memory, "model_config", read_again)
    assert "memory per GPU: model tiny" in dry_run(config, args.cluster, args.model_config)
