"""Issue 3: released checkpoints in both layouts, starting from parts, saving back (unsharded, CPU, tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import JanusForConditionalGeneration, LlamaForCausalLM

from model.config import config_from_original, preset_config
from model.janus import JanusProForTraining
from model.weights import (
    ATTN_POOL,
    CODEBOOK_USED,
    WeightsError,
    load_model,
    load_parts,
    original_groups,
    read_entries,
    save_checkpoint,
)


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return {k: e.read() for k, e in read_entries(path).items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    differ = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not differ, differ


@pytest.fixture(scope="session")
def loaded_original(original_checkpoint):
    """The tiny model loaded (unsharded) from the original-layout checkpoint, with what was kept aside."""
    model, aside = load_model(original_checkpoint)
    return model.eval(), aside


def test_original_export_has_the_official_key_set(official_keys, tmp_path):
    # A model that never saw an original checkpoint: attention pool and codebook usage are initialised.
    config = preset_config("tiny")
    torch.manual_seed(0)
    save_checkpoint(JanusProForTraining(config), tmp_path, "original")
    saved = {k: e.shape for k, e in read_entries(tmp_path).items()}
    assert saved == official_keys(config)
    assert torch.equal(tensors_of(tmp_path)[CODEBOOK_USED], torch.zeros(65536))


def test_original_round_trip_is_lossless(official_keys, original_checkpoint, loaded_original, tmp_path):
    model, aside = loaded_original
    assert set(aside) == {k for k in official_keys(model.config) if k.startswith(ATTN_POOL)} | {CODEBOOK_USED}
    save_checkpoint(model, tmp_path, "original", aside, max_shard_bytes=2**20)  # several shards
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert_same_tensors(tensors_of(original_checkpoint), tensors_of(tmp_path))


def test_qkv_is_split_and_pos_embed_squeezed(original_checkpoint, loaded_original):
    model, _ = loaded_original
    source = tensors_of(original_checkpoint)
    qkv = source["vision_model.vision_tower.blocks.1.attn.qkv.weight"]
    attn = model.model.vision_model.encoder.layers[1].self_attn
    assert torch.equal(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]), qkv)
    assert torch.equal(model.model.vision_model.embeddings.position_embedding.weight,
                       source["vision_model.vision_tower.pos_embed"][0])
    assert torch.equal(model.model.aligner.hidden_layers[0].weight, source["aligner.layers.2.weight"])
    assert torch.equal(model.lm_head.weight, source["language_model.lm_head.weight"])


def test_transformers_round_trip_is_lossless(tmp_path):
    # The source is written by transformers' own save_pretrained: the converted layout as transformers has it.
    torch.manual_seed(0)
    JanusForConditionalGeneration(preset_config("tiny")).save_pretrained(tmp_path / "src")
    model, aside = load_model(tmp_path / "src")
    assert aside == {}
    save_checkpoint(model, tmp_path / "out", "transformers", max_shard_bytes=2**20)
    assert_same_tensors(tensors_of(tmp_path / "src"), tensors_of(tmp_path / "out"))


def text_logits(model: JanusForConditionalGeneration, ids: torch.Tensor) -> torch.Tensor:
    # transformers' own forward (our subclass replaces it with the packed one)
    return JanusForConditionalGeneration.forward(model, input_ids=ids, use_cache=False).logits


def test_transformers_save_loads_in_from_pretrained(loaded_original, tmp_path):
    model, _ = loaded_original
    save_checkpoint(model, tmp_path, "transformers", max_shard_bytes=2**20)
    hf, info = JanusForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True,
                                                             dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.lm_head.weight.data_ptr() != hf.model.language_model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, model.config.text_config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(text_logits(hf.eval(), ids), text_logits(model, ids), atol=1e-5, rtol=0)


def test_starting_from_parts(original_checkpoint, loaded_original, tmp_path):
    reference, _ = loaded_original
    source = tensors_of(original_checkpoint)
    # DeepSeek-LLM as a transformers Llama directory (separate LM head), timm SigLIP, LlamaGen VQ (.pt pickle)
    llm = LlamaForCausalLM(reference.config.text_config)
    llm.load_state_dict({k.removeprefix("language_model."): v for k, v in source.items()
                         if k.startswith("language_model.")})
    llm.save_pretrained(tmp_path / "llm")
    tower = "vision_model.vision_tower."
    save_file({k.removeprefix(tower): v for k, v in source.items() if k.startswith(tower)},
              str(tmp_path / "siglip.safetensors"))
    vq = {k.removeprefix("gen_vision_model."): v for k, v in source.items() if k.startswith("gen_vision_model.")}
    torch.save({"model": vq, "optimizer": {"steps": 1}}, tmp_path / "vq.pt")

    torch.manual_seed(5)
    model = JanusProForTraining(preset_config("tiny"))
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    aside = load_parts(model, tmp_path / "llm", tmp_path / "siglip.safetensors", tmp_path / "vq.pt")

    state, ref = model.state_dict(), reference.state_dict()
    loaded = ("model.language_model.", "lm_head.", "model.vision_model.", "model.vqmodel.")
    for key in state:
        if key.startswith(loaded):
            assert torch.equal(state[key], ref[key]), key
        else:  # adaptors, generation embedding and head: the model's own fresh initialisation
            assert torch.equal(state[key], fresh[key]) and not torch.equal(state[key], ref[key]), key
            assert torch.isfinite(state[key]).all() and (key.endswith(".bias") or state[key].std() > 0), key
    assert model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr()
    assert not torch.equal(model.lm_head.weight, model.model.language_model.embed_tokens.weight)
    assert set(aside) == {k for k in source if k.startswith(tower + "attn_pool.")} | {CODEBOOK_USED}
    assert all(torch.equal(aside[k], source[k]) for k in aside)


def test_misfit_checkpoint_is_one_error_listing_every_key(original_checkpoint, tmp_path):
    tensors = tensors_of(original_checkpoint)
    del tensors["gen_embed.weight"]
    tensors["language_model.model.extra.weight"] = torch.zeros(2)
    tensors["aligner.layers.0.bias"] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((original_checkpoint / "config.json").read_text())
    with pytest.raises(WeightsError) as error:
        load_model(tmp_path)
    message = str(error.value)
    for expected in ("1 missing", "model.generation_embeddings.weight", "1 unexpected",
                     "language_model.model.extra.weight", "1 mis-shaped", "model.aligner.fc1.bias: (3,)"):
        assert expected in message, message


def test_released_original_config_reads_as_janus_pro_1b(official_keys):
    # The fields transformers' convert_janus_weights_to_hf.py reads from a released config.json.
    released = {
        "model_type": "multi_modality",
        "vision_config": {"cls": "CLIPVisionTower", "params": {"image_size": 384,
                                                               "model_name": "siglip_large_patch16_384"}},
        "aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 1024, "n_embed": 2048}},
        "gen_vision_config": {"cls": "VQ-16", "params": {"image_token_size": 16384, "n_embed": 8}},
        "gen_aligner_config": {"cls": "MlpProjector", "params": {"depth": 2, "input_dim": 8, "n_embed": 2048}},
        "gen_head_config": {"cls": "vision_head", "params": {"image_token_embed": 2048, "image_token_size": 16384,
                                                             "n_embed": 2048}},
        "language_config": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 16,
                            "num_hidden_layers": 24, "num_key_value_heads": 16, "vocab_size": 102400,
                            "model_type": "llama", "torch_dtype": "bfloat16"},
    }
    config = config_from_original(json.loads(json.dumps(released)), image_token_id=100581)
    with torch.device("meta"):
        model = JanusProForTraining(config)
    expected = official_keys(config)
    assert set(original_groups([n for n, _ in model.named_parameters()])) | {
        k for k in expected if k.startswith(ATTN_POOL) or k == CODEBOOK_USED} == set(expected)
    assert config.vision_config.hidden_size == 1024 and config.vq_config.num_embeddings == 16384
    assert config.tie_word_embeddings is False
