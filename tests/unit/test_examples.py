"""examples/: every fine-tune preset resolves as a --config file and its --dry-run plans it, in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from huggingface_hub import constants

from pipeline.config import resolve
from pipeline.planning import dry_run

EXAMPLES = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))


def test_there_are_presets():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("preset", EXAMPLES, ids=lambda path: path.stem)
def test_a_preset_resolves_and_dry_runs(preset, monkeypatch, tmp_path):
    text = preset.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert "python -m preprocess" in "\n".join(header) and "launchers/stage3.py" in "\n".join(header)
    values = yaml.safe_load(text)
    # The presets name released weights by hub id, in no cache here: a plan downloads nothing and plans a release from
    # the preset of its architecture.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    size = "7b" if "7B" in values["init"] else "1b"
    # Their --data is not here to count epochs: a --train-steps flag overrides the file's --epochs.
    config, args = resolve(None, ["--config", str(preset), "--train-steps", "1000", "--dry-run"])
    assert config.model.model == size
    assert config.stage == values["stage"] and config.data.ratio == [float(r) for r in values["ratio"]]
    assert (config.optim.train_steps, config.optim.warmup_steps) == (1000, 0)  # Stage III: no warm-up
    assert args.epochs is None and values["epochs"] > 0
    plan = dry_run(config, args.cluster, args.model_config)
    assert f"over {values['world_size']} " in plan
