"""Model presets: Table 1 of the paper as transformers `JanusConfig`s.

`tiny` is for CPU tests and the demo; `1b` and `7b` follow Table 1 and the public configs
(intermediate sizes and the absence of GQA are read from public configs, not the paper). A
checkpoint directory's own config.json always wins over a preset.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import JanusConfig, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig


@dataclass(frozen=True)
class Preset:
    hidden_size: int  # D in Table 1
    num_layers: int
    num_heads: int
    intermediate_size: int
    vocab_size: int = 102_400
    context: int = 4096
    # Understanding encoder (SigLIP-Large-Patch16-384) and generation encoder (VQ-16)
    vision_width: int = 1024
    vision_layers: int = 24
    vision_heads: int = 16
    image_size: int = 384
    patch_size: int = 16
    codebook_size: int = 16_384
    codebook_dim: int = 8
    vq_base_channels: int = 128
    vq_res_blocks: int = 2
    vq_latent_channels: int = 256


PRESETS = {
    "tiny": Preset(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1024,
                   vision_width=32, vision_layers=2, vision_heads=2, codebook_size=1024,
                   vq_base_channels=32, vq_res_blocks=1, vq_latent_channels=64),
    "1b": Preset(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5632),
    "7b": Preset(hidden_size=4096, num_layers=30, num_heads=32, intermediate_size=11008),
}


# Precision names every command line takes (export, generation, chat, conversion, the preprocessing VQ): the short
# and torch's spellings both, since users type either.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def preset_config(name: str, image_token_id: int | None = None) -> JanusConfig:
    """The JanusConfig of a named preset."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    text = LlamaConfig(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads,
        max_position_embeddings=p.context, rms_norm_eps=1e-6,
    )
    vision = JanusVisionConfig(
        hidden_size=p.vision_width, num_hidden_layers=p.vision_layers, num_attention_heads=p.vision_heads,
        image_size=p.image_size, patch_size=p.patch_size, projection_dim=p.hidden_size,
    )
    vq = JanusVQVAEConfig(
        embed_dim=p.codebook_dim, num_embeddings=p.codebook_size, base_channels=p.vq_base_channels,
        num_res_blocks=p.vq_res_blocks, latent_channels=p.vq_latent_channels,
        projection_dim=p.hidden_size, image_token_embed_dim=p.hidden_size,
    )
    return _finished(JanusConfig(text_config=text, vision_config=vision, vq_config=vq), image_token_id)


def model_config(name_or_path: str | Path, image_token_id: int | None = None) -> JanusConfig:
    """The one resolver of a model config, for training, export and inference: a preset by name, or the
    config.json of a checkpoint directory in either layout (which overrides any preset)."""
    path = Path(name_or_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        if str(name_or_path) in PRESETS:
            return preset_config(str(name_or_path), image_token_id)
        raise ValueError(f"{name_or_path}: neither a model preset ({', '.join(PRESETS)}) nor a directory with "
                         f"a config.json")
    data = json.loads(config_file.read_text())
    if data.get("model_type") == "multi_modality":
        return config_from_original(data, image_token_id)
    return _finished(JanusConfig.from_dict(data), image_token_id)


def model_size(config: JanusConfig) -> str:
    """Which Table 2 column a model trains under (only Stage III differs): 7b for Table 1's 7B width."""
    return "7b" if config.text_config.hidden_size >= PRESETS["7b"].hidden_size else "1b"


def _finished(config: JanusConfig, image_token_id: int | None) -> JanusConfig:
    """The only place the LM head is untied: DeepSeek-LLM keeps its embedding and LM head apart."""
    config.tie_word_embeddings = False
    config.text_config.tie_word_embeddings = False
    if image_token_id is not None:
        config.image_token_id = image_token_id
    return config


def original_config(config: JanusConfig) -> dict:
    """The original (`multi_modality`) config.json for `config`, with ours embedded for an exact reload.

    The official code hard-codes SigLIP-L and VQ-16 by name; the embedded `janus_pipeline` entry keeps
    the sizes of other configs (the tiny test model) and is ignored by the official loader.
    """
    text, vision, vq = config.text_config, config.vision_config, config.vq_config
    return {
        "architectures": ["MultiModalityCausalLM"],
        "model_type": "multi_modality",
        "vision_config": {"cls": "CLIPVisionTower", "model_type": "vision", "params": {
            "image_size": vision.image_size, "model_name": "siglip_large_patch16_384",
            "select_feature": "same", "select_layer": -1}},
        "aligner_config": {"cls": "MlpProjector", "model_type": "aligner", "params": {
            "depth": vision.depth, "input_dim": vision.hidden_size, "n_embed": vision.projection_dim,
            "projector_type": "mlp_gelu"}},
        "gen_vision_config": {"cls": "VQ-16", "model_type": "gen_vision", "params": {
            "image_token_size": vq.num_embeddings, "n_embed": vq.embed_dim}},
        "gen_aligner_config": {"cls": "MlpProjector", "model_type": "gen_aligner", "params": {
            "depth": vq.num_hidden_layers, "input_dim": vq.embed_dim, "n_embed": vq.projection_dim,
            "projector_type": "mlp_gelu"}},
        "gen_head_config": {"cls": "vision_head", "model_type": "gen_head", "params": {
            "image_token_embed": vq.image_token_embed_dim, "image_token_size": vq.num_embeddings,
            "n_embed": text.hidden_size}},
        "language_config": {k: v for k, v in text.to_dict().items() if k in {
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
            "model_type", "tie_word_embeddings"}},
        "janus_pipeline": config.to_dict(),
    }


def config_from_original(data: Mapping, image_token_id: int | None = None) -> JanusConfig:
    """A JanusConfig from an original config.json (ours when embedded, else read as transformers'
    convert_janus_weights_to_hf.py reads it: SigLIP-L and VQ-16 are the config classes' defaults)."""
    if "janus_pipeline" in data:
        return _finished(JanusConfig.from_dict(dict(data["janus_pipeline"])), image_token_id)
    p = {name: data.get(name, {}).get("params", {}) for name in (
        "vision_config", "aligner_config", "gen_vision_config", "gen_aligner_config", "gen_head_config")}
    lang = {k: v for k, v in data["language_config"].items() if k not in ("model_type", "torch_dtype",
                                                                           "_attn_implementation")}
    text = LlamaConfig(**lang)
    vision = JanusVisionConfig(image_size=p["vision_config"].get("image_size", 384),
                               projection_dim=p["aligner_config"].get("n_embed", text.hidden_size),
                               depth=p["aligner_config"].get("depth", 2))
    vq = JanusVQVAEConfig(embed_dim=p["gen_vision_config"].get("n_embed", 8),
                          num_embeddings=p["gen_vision_config"].get("image_token_size", 16_384),
                          projection_dim=p["gen_aligner_config"].get("n_embed", text.hidden_size),
                          num_hidden_layers=p["gen_aligner_config"].get("depth", 2),
                          image_token_embed_dim=p["gen_head_config"].get("image_token_embed", text.hidden_size))
    return _finished(JanusConfig(text_config=text, vision_config=vision, vq_config=vq), image_token_id)


def num_image_tokens(config: JanusConfig) -> int:
    """Image positions per image: (image_size / patch_size)^2 = 576 at 384/16."""
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2
