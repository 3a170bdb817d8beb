"""LoRA (issue 28) on 2 CPU ranks: a Stage III run under ZeRO-3 trains, resumes to the same losses, exports merged
and as a peft adapter folder, and hands a merged start to the next stage; a short run under ZeRO-2 trains too.

Three launches in all, each a few steps: the ZeRO-3 run (4 steps, checkpoints at 2 and 4), its resume from step 2,
and the ZeRO-2 run (2 steps). Everything else is in this process, on their checkpoints.
"""

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from model.lora import fully_trained, is_adapter
from model.stages import STAGES, part_of
from pipeline.checkpoint import latest_checkpoint
from tests.support import REPO, consolidated, losses, run_ranks, stage_args, tensors

pytestmark = pytest.mark.integration

LORA = ("--lora-rank", "4", "--learning-rate", "1e-3", "--save-every", "2", "--keep-last", "3")
DURATIONS: dict[str, float] = {}  # seconds per launch, printed for the suite's timing notes


def launch(name: str, args: list[str]) -> list[str]:
    started = time.monotonic()
    out = run_ranks(args, timeout=600)
    DURATIONS[name] = time.monotonic() - started
    print(f"launch {name}: {DURATIONS[name]:.0f} s")
    return out


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory, shard_corpus, tokenizer_dir, init_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora")

    def args(run: Path, *extra: str) -> list[str]:
        return stage_args(3, shard_corpus, tokenizer_dir, run, init_checkpoint, *LORA, *extra)

    straight, resumed = root / "straight", root / "resumed"
    launch("zero3 4 steps", args(straight, "--train-steps", "4"))
    shutil.copytree(straight, resumed)  # the same run stopped after step 2: its later checkpoint never written
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    out = launch("zero3 resume 2 -> 4", args(resumed, "--train-steps", "4"))[0]
    assert f"resumed from {resumed / 'checkpoints' / 'step-00000002'} at step 2" in out, out[-3000:]
    zero2 = root / "zero2.json"
    template = json.loads((REPO / "ds_configs" / "zero3_cpu.json").read_text())
    template["zero_optimization"] = {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                     "reduce_bucket_size": 1 << 20}
    zero2.write_text(json.dumps(template))
    launch("zero2 2 steps", args(root / "zero2", "--train-steps", "2", "--ds-config", str(zero2)))
    print("launch durations:", {k: round(v) for k, v in DURATIONS.items()})
    return {"straight": straight, "resumed": resumed, "zero2": root / "zero2", "root": root}


def changed_parts(init: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> set[str]:
    """Parts whose weights moved, tensor by tensor: an adapted layer's base weight compared with --init's."""
    assert {k.replace(".base_layer.", ".") for k in state if not is_adapter(k)} == set(init)
    return {part_of(k) for k in state if not is_adapter(k) and not torch.equal(state[k], init[k.replace(
        ".base_layer.", ".")])}


def check_only_adapters_and_heads_moved(run: Path, init_checkpoint: Path) -> None:
    init, state = tensors(init_checkpoint), consolidated(run)
    adapters = {k: v for k, v in state.items() if is_adapter(k)}
    assert len(adapters) == 2 * 7 * 2  # lora_A and lora_B on 7 projections in each of the tiny LLM's 2 layers
    assert all(v.abs().max() > 0 for k, v in adapters.items() if ".lora_B." in k)  # lora_B starts at 0: it trained
    assert changed_parts(init, state) == set(fully_trained(STAGES[3].trainable))  # LLM, SigLIP, VQ: bit for bit


def test_lora_zero3_trains_and_resumes_to_the_same_losses(lora_runs, init_checkpoint):
    straight, resumed = losses(lora_runs["straight"]), losses(lora_runs["resumed"])
    assert sorted(straight) == sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), step
    check_only_adapters_and_heads_moved(lora_runs["straight"], init_checkpoint)
    names = consolidated(lora_runs["straight"])
    assert "model.language_model.layers.0.self_attn.q_proj.base_layer.weight" in names
    assert "model.vision_model.encoder.layers.0.self_attn.q_proj.weight" in names  # SigLIP's stay plain


def test_lora_zero2_trains_only_adapters_and_heads(lora_runs, init_checkpoint):
    assert sorted(losses(lora_runs["zero2"])) == [1, 2]
    check_only_adapters_and_heads_moved(lora_runs["zero2"], init_checkpoint)


def lora_training_model(run: Path, init_checkpoint: Path):
    """The model the run trained, adapters and all, with its last checkpoint's weights (in this process)."""
    from model.lora import inject
    from model.weights import load_model
    from pipeline.config import TrainConfig
    from pipeline.run_dir import config_file

    model, _ = load_model(init_checkpoint)
    inject(model, TrainConfig.load(config_file(run)).lora.settings(), seed=0)
    model.load_state_dict(consolidated(run), strict=True)
    return model.eval()


def logits(model, tokenizer) -> torch.Tensor:
    from transformers import JanusForConditionalGeneration

    from model.chat_format import text_sample

    ids = torch.tensor([text_sample(tokenizer, "The quick brown fox jumps over the lazy dog.").input_ids])
    with torch.no_grad():
        return JanusForConditionalGeneration.forward(model, input_ids=ids).logits


def test_merged_and_adapter_exports_give_the_lora_models_logits(lora_runs, init_checkpoint, tokenizer):
    from peft import PeftModel
    from transformers import JanusForConditionalGeneration

    from pipeline.export import export

    run, root = lora_runs["straight"], lora_runs["root"]
    ours = logits(lora_training_model(run, init_checkpoint), tokenizer)
    merged = export(run, root / "merged", "transformers", dtype="fp32").path
    model, info = JanusForConditionalGeneration.from_pretrained(str(merged), dtype=torch.float32,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    torch.testing.assert_close(logits(model.eval(), tokenizer), ours, atol=1e-5, rtol=0)
    assert export(run, root / "merged-original", "original", dtype="fp32").tensors > 0  # the other layout too

    adapter = export(run, root / "adapter", dtype="fp32", lora_export="adapter").path
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    base = JanusForConditionalGeneration.from_pretrained(str(init_checkpoint), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    torch.testing.assert_close(logits(peft_model.base_model.model, tokenizer), ours, atol=1e-5, rtol=0)


def test_the_next_stage_starts_from_the_merged_weights(lora_runs, special):
    """--init of a LoRA run: consolidated with the adapters merged in, under plain names, as the next stage loads it
    (strictly, into a model without adapters)."""
    from model.config import preset_config
    from model.janus import JanusProForTraining
    from model.weights import load_checkpoint
    from pipeline.checkpoint import consolidate
    from pipeline.export import export

    run = lora_runs["straight"]
    start = consolidate(run)
    merged = tensors(start)
    assert not any(is_adapter(k) or ".base_layer." in k for k in merged)
    exported = tensors(export(run, lora_runs["root"] / "merged-again", "transformers", dtype="fp32").path)
    assert sorted(exported) == sorted(merged) and all(torch.equal(merged[k], exported[k]) for k in merged)
    assert latest_checkpoint(run).name in str(start)
    load_checkpoint(JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder)), start)


def test_an_adapter_export_that_cannot_be_made_is_one_line(lora_runs, tmp_path, capsys):
    """--lora-export adapter of a run trained without LoRA, or in DeepSeek's original layout: refused in one line
    before any weight is read."""
    import yaml

    from pipeline.export import main

    plain = tmp_path / "plain"  # the LoRA run's files, its config.yaml saying it trained without LoRA
    shutil.copytree(lora_runs["straight"], plain)
    config = yaml.safe_load((plain / "config.yaml").read_text())
    config["lora"]["lora_rank"] = 0
    (plain / "config.yaml").write_text(yaml.safe_dump(config))
    for run, extra, said in ((plain, [], "trained without LoRA (--lora-rank 0): export it whole"),
                             (lora_runs["straight"], ["--layout", "original"], "drop --layout original")):
        with pytest.raises(SystemExit) as exited:
            main(["--checkpoint", str(run), "--out", str(tmp_path / "out"), "--lora-export", "adapter", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert exited.value.code == 2 and len(err) == 1 and err[0].startswith("error: --lora-export adapter"), err
        assert said in err[0] and not (tmp_path / "out").exists()
