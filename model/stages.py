"""The three training stages: the paper's Table 2 in one place, and which parts each one trains.

Read this table against Table 2 of the Janus-Pro paper (arXiv 2501.17811). Launchers take their
defaults from here; flags and YAML files override them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

# The model's parts, as parameter-name prefixes of transformers' JanusForConditionalGeneration.
PARTS = {
    "und_encoder": "model.vision_model.",       # SigLIP-L/16-384
    "und_adaptor": "model.aligner.",
    "gen_encoder": "model.vqmodel.",            # VQ-16: frozen in every stage
    "gen_embedding": "model.generation_embeddings.",
    "gen_adaptor": "model.generation_aligner.",
    "gen_head": "model.generation_head.",
    "llm": "model.language_model.",
    "lm_head": "lm_head.",
}
# What a stage may train: every part but the VQ, which stays as preprocessing used it to make the ids.
TRAINABLE_PARTS = tuple(part for part in PARTS if part != "gen_encoder")
# SigLIP's attention-pool head (present in the original layout) is never used, so never trained.
NEVER_TRAINED = ("model.vision_model.head.",)


@dataclass(frozen=True)
class Stage:
    """One column of Table 2. `rows_per_step` counts packed rows of `seq_len` tokens (docs/facts.md)."""

    learning_rate: float
    warmup_steps: int
    train_steps: int
    rows_per_step: int
    ratio: tuple[int, int, int]  # und : text : gen
    trainable: tuple[str, ...] = field(default=())
    adam_betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seq_len: int = 4096


ADAPTORS_AND_HEADS = ("und_adaptor", "gen_embedding", "gen_adaptor", "gen_head")

STAGES = {
    # Stage I: LLM frozen; ImageNet category names as generation prompts. Whether the generation
    # embedding trains here is not in the paper: it is on by default (drop it from `trainable`).
    1: Stage(learning_rate=1.0e-3, warmup_steps=600, train_steps=20_000, rows_per_step=256, ratio=(1, 0, 3),
             trainable=ADAPTORS_AND_HEADS),
    # Stage II: everything but the two encoders. 360K steps planned; the paper stopped at 270K.
    2: Stage(learning_rate=1.0e-4, warmup_steps=5000, train_steps=270_000, rows_per_step=512, ratio=(2, 3, 5),
             trainable=ADAPTORS_AND_HEADS + ("llm", "lm_head")),
    # Stage III: SigLIP unfrozen too. 80K steps for 1B, 40K for 7B (see stage_for).
    3: Stage(learning_rate=4.0e-5, warmup_steps=0, train_steps=80_000, rows_per_step=128, ratio=(5, 1, 4),
             trainable=ADAPTORS_AND_HEADS + ("llm", "lm_head", "und_encoder")),
}


def stage_for(stage: int, model_size: str = "1b") -> Stage:
    """Table 2 for a stage and model size (only Stage III's steps differ: 7B trained 40K)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage}; Janus-Pro has stages {sorted(STAGES)}")
    if stage == 3 and model_size == "7b":
        return replace(STAGES[3], train_steps=40_000)
    return STAGES[stage]


def part_of(name: str) -> str | None:
    """The part a parameter name belongs to, or None for one outside every part."""
    return next((part for part, prefix in PARTS.items() if name.startswith(prefix)), None)


def set_trainable(model: nn.Module, trainable: tuple[str, ...] | list[str]) -> list[str]:
    """Mark exactly the parameters of the named parts trainable; return their names."""
    unknown = sorted(set(trainable) - set(TRAINABLE_PARTS))
    if unknown:
        raise ValueError(f"cannot train {unknown}; trainable parts are {', '.join(TRAINABLE_PARTS)}")
    names = []
    for name, param in model.named_parameters():
        train = part_of(name) in trainable and not name.startswith(NEVER_TRAINED)
        param.requires_grad_(train)
        if train:
            names.append(name)
    return names
