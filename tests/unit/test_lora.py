"""LoRA (issue 28), in process: its flags and their refusals, the training rule (adapters and the parts trained whole,
nothing else), the merge math, the adapter file's names, a resume with other LoRA settings refused, the dry run's
smaller optimizer. The 2-rank runs, exports and peft loading are in tests/integration/test_lora.py."""

from __future__ import annotations

import pytest
import torch
import yaml

from model.config import preset_config
from model.janus import JanusProForTraining
from model.lora import (
    DEFAULT_TARGETS,
    LoraSettings,
    adapter_parameter_count,
    adapter_state,
    fully_trained,
    inject,
    is_adapter,
    merged_state,
    modules_to_save,
    set_trainable_with_lora,
    target_names,
)
from model.stages import STAGES, part_of
from pipeline.config import ConfigError, TrainConfig, resolve

FLAGS = ["--model", "tiny", "--data", "und", "text", "gen"]
SETTINGS = LoraSettings(rank=4, alpha=8.0, dropout=0.05, target_modules=DEFAULT_TARGETS)


@pytest.fixture
def model() -> JanusProForTraining:
    torch.manual_seed(0)
    return JanusProForTraining(preset_config("tiny", image_token_id=5)).eval()


def test_flags_yaml_defaults_and_alpha_recorded(tmp_path):
    off, _ = resolve(3, FLAGS)
    assert off.lora.lora_rank == 0 and off.lora.settings() is None
    config, _ = resolve(3, [*FLAGS, "--lora-rank", "8"])
    assert config.lora.settings() == LoraSettings(rank=8, alpha=16.0, dropout=0.05, target_modules=DEFAULT_TARGETS)
    file = tmp_path / "lora.yaml"
    file.write_text(yaml.safe_dump({"lora": {"lora_rank": 2, "lora_alpha": 3, "lora_dropout": 0.0}}))
    config, _ = resolve(3, [*FLAGS, "--config", str(file), "--lora-target-modules", r".*layers\.1\.mlp\.down_proj"])
    assert (config.lora.lora_rank, config.lora.lora_alpha, config.lora.lora_dropout) == (2, 3.0, 0.0)
    config.save(tmp_path / "config.yaml")
    assert TrainConfig.load(tmp_path / "config.yaml") == config  # the alpha used is what config.yaml says
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del saved["lora"]  # a run saved before LoRA existed reads as LoRA off
    assert TrainConfig.from_dict(saved).lora.lora_rank == 0


@pytest.mark.parametrize(("flags", "match"), [
    (["--lora-rank", "-1"], "--lora-rank: must be 0 .off. or more"),
    (["--lora-rank", "4", "--lora-dropout", "1"], r"--lora-dropout: a probability in \[0, 1\)"),
    (["--lora-rank", "4", "--lora-alpha", "0"], "--lora-alpha: must be positive"),
    (["--lora-rank", "4", "--lora-target-modules", "(q_proj"], "--lora-target-modules: not a regular expression"),
    (["--lora-rank", "4", "--lora-target-modules", "q_proj"],
     "--lora-target-modules: 'q_proj' matches no module .*named like model.language_model.layers.0.self_attn.q_proj"),
    (["--lora-rank", "4", "--lora-target-modules", r"model\.language_model\.layers\.0"],
     "matches modules that are not linear layers, e.g. model.language_model.layers.0"),
    (["--lora-rank", "4", "--lora-target-modules", "lm_head"], "matches lm_head .* outside the parts LoRA adapts"),
    (["--lora-rank", "4", "--trainable", "gen_head"], "--lora-rank: the stage does not train the LLM"),
])
def test_each_refusal_names_its_flag(flags, match):
    with pytest.raises(ConfigError, match=match):
        resolve(3, [*FLAGS, *flags])


def test_lora_without_peft_installed_is_one_line(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(ConfigError, match=r"--lora-rank: LoRA needs peft: pip install 'janus-pipeline\[train\]'"):
        resolve(3, [*FLAGS, "--lora-rank", "4"])


def test_stage_one_with_lora_is_refused():
    with pytest.raises(ConfigError, match="--lora-rank: the stage does not train the LLM"):
        resolve(1, [*FLAGS, "--lora-rank", "4"])


def test_default_targets_are_the_llms_projections_not_siglips(model):
    names = target_names(model, DEFAULT_TARGETS)
    assert len(names) == 2 * 7 and all(part_of(n + ".") == "llm" for n in names)
    assert not any(n.startswith("model.vision_model.") for n in names)  # SigLIP's q/k/v_proj are left alone


def test_training_rule_adapters_and_the_parts_trained_whole(model):
    inject(model, SETTINGS, seed=0)
    trainable = set(set_trainable_with_lora(model, STAGES[3].trainable))
    assert trainable == {n for n, p in model.named_parameters() if p.requires_grad}
    whole = set(fully_trained(STAGES[3].trainable))
    assert whole == {"und_adaptor", "gen_embedding", "gen_adaptor", "gen_head", "lm_head"}
    for name, _ in model.named_parameters():
        expected = is_adapter(name) or (part_of(name) in whole)
        assert (name in trainable) == expected, name
    assert not any(part_of(n) in ("llm", "und_encoder") and not is_adapter(n) for n in trainable)
    count = sum(p.numel() for n, p in model.named_parameters() if is_adapter(n))
    with torch.device("meta"):
        meta = JanusProForTraining(preset_config("tiny", image_token_id=5))
    assert adapter_parameter_count(meta, SETTINGS) == count


def test_adapters_are_the_same_for_the_same_seed(model):
    other = JanusProForTraining(preset_config("tiny", image_token_id=5))
    inject(model, SETTINGS, seed=3)
    inject(other, SETTINGS, seed=3)
    mine, theirs = dict(model.named_parameters()), dict(other.named_parameters())
    assert all(torch.equal(mine[n], theirs[n]) for n in mine if is_adapter(n))


def text_logits(model: torch.nn.Module) -> torch.Tensor:
    from transformers import JanusForConditionalGeneration

    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        return JanusForConditionalGeneration.forward(model, input_ids=ids).logits


def test_merge_math_gives_the_adapted_models_logits(model):
    plain = JanusProForTraining(preset_config("tiny", image_token_id=5)).eval()
    plain.load_state_dict(model.state_dict())
    inject(model, SETTINGS, seed=0)
    with torch.no_grad():  # lora_B starts at 0: give the adapters something to merge
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.5)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = merged_state(state, SETTINGS)
    assert set(merged) == set(plain.state_dict())
    q = "model.language_model.layers.0.self_attn.q_proj."
    expected = state[q + "base_layer.weight"] + 2.0 * state[q + "lora_B.default.weight"] @ state[
        q + "lora_A.default.weight"]
    torch.testing.assert_close(merged[q + "weight"], expected)
    plain.load_state_dict(merged, strict=True)
    torch.testing.assert_close(text_logits(plain), text_logits(model.eval()), atol=1e-5, rtol=0)


def test_adapter_file_names_are_peft_s(model):
    inject(model, SETTINGS, seed=0)
    out = adapter_state(dict(model.state_dict()), STAGES[3].trainable)
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in out
    assert "base_model.model.lm_head.weight" in out and "base_model.model.model.aligner.fc1.weight" in out
    assert not any("base_layer" in k or "vision_model" in k or "vqmodel" in k for k in out)
    assert modules_to_save(STAGES[3].trainable) == ["model.aligner", "model.generation_embeddings",
                                                    "model.generation_aligner", "model.generation_head", "lm_head"]


def test_a_resume_with_other_lora_settings_is_refused(tmp_path):
    from pipeline.preflight import check_resume_matches
    from tests.support import run_to_resume

    flags = [*FLAGS, "--output", str(tmp_path / "run")]
    run_to_resume(tmp_path / "run", 3, [*flags, "--lora-rank", "4"])
    check_resume_matches(resolve(3, [*flags, "--lora-rank", "4"])[0])  # the same: fine
    with pytest.raises(ConfigError, match=r"other settings: lora \{'lora_rank': 4, 'lora_alpha': 8.0\} -> "
                                          r"\{'lora_rank': 8, 'lora_alpha': 16.0\}\. .*--allow-config-change lora"):
        check_resume_matches(resolve(3, [*flags, "--lora-rank", "8"])[0])
    with pytest.raises(ConfigError, match=r"lora \{'lora_rank': 4, 'lora_alpha': 8.0\} -> \{'lora_rank': 0, "):
        check_resume_matches(resolve(3, flags)[0])  # LoRA dropped: the checkpoint's names would not load


def test_dry_run_counts_adapters_and_the_parts_trained_whole():
    from pipeline.planning.memory import lora_layer_activation_bytes, param_counts, workload

    full, lora = workload("1b", STAGES[3]), workload("1b", STAGES[3], lora=SETTINGS)
    assert lora.params.adapters > 0 and lora.params.total == full.params.total + lora.params.adapters
    whole = param_counts("1b", fully_trained(STAGES[3].trainable)).trainable
    assert lora.params.trainable == whole + lora.params.adapters < full.params.trainable / 5
    assert "und_encoder" not in lora.stage.trainable  # SigLIP frozen: none of its activations kept
    t = lora.config.text_config  # 4 projections read D, gate/up D, down I: (3 * in + 2 * r) each with dropout
    assert lora_layer_activation_bytes(lora.config, SETTINGS) == 3 * (6 * t.hidden_size + t.intermediate_size) + \
        7 * 2 * SETTINGS.rank
