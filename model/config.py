"""Model presets: Table 1 of the paper as transformers `JanusConfig`s.

`tiny` is for CPU tests and the demo; `1b` and `7b` follow Table 1 and the public configs
(intermediate sizes and the absence of GQA are read from public configs, not the paper). A
checkpoint directory's own config.json always wins over a preset.
"""

from __future__ import annotations

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


# Precision names used on command lines (export, generation).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def preset_config(name: str, image_token_id: int | None = None) -> JanusConfig:
    """The JanusConfig of a named preset (LM head untied: DeepSeek-LLM does not tie it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[name]
    text = LlamaConfig(
        vocab_size=p.vocab_size, hidden_size=p.hidden_size, intermediate_size=p.intermediate_size,
        num_hidden_layers=p.num_layers, num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads,
        max_position_embeddings=p.context, rms_norm_eps=1e-6, tie_word_embeddings=False,
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
    config = JanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=False)
    if image_token_id is not None:
        config.image_token_id = image_token_id
    return config


def load_config(name_or_path: str | Path, image_token_id: int | None = None) -> JanusConfig:
    """A preset by name, or the config.json of a checkpoint directory (which overrides any preset)."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        config = JanusConfig.from_pretrained(str(path))
        config.tie_word_embeddings = False
        return config
    return preset_config(str(name_or_path), image_token_id)


def num_image_tokens(config: JanusConfig) -> int:
    """Image positions per image: (image_size / patch_size)^2 = 576 at 384/16."""
    return (config.vision_config.image_size // config.vision_config.patch_size) ** 2
