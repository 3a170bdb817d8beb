"""Set-up of a stage: its model (built sharded, filled from --init) inside its own DeepSpeed engine.

Each stage is its own engine: which parameters train cannot change inside one.
"""

from __future__ import annotations

from pathlib import Path

import deepspeed
import torch

from model.config import model_config
from model.janus import JanusProForTraining
from model.manifest import weights_fingerprint
from model.stages import set_trainable
from model.weights import load_checkpoint
from pipeline import checkpoint
from pipeline.attention import use_attention
from pipeline.config import TrainConfig, run_directory
from pipeline.ds_config import BatchPlan, deepspeed_config
from pipeline.schedule import lr_scheduler


def run_deepspeed_config(config: TrainConfig, plan: BatchPlan) -> dict:
    """--ds-config's template with this run's batch plan, bucket sizes for its model's width and its optimiser."""
    template = config.system.ds_config or ("zero3_bf16" if torch.cuda.is_available() else "zero3_cpu")
    optim, width = config.optim, model_config(config.model.model).text_config.hidden_size
    return deepspeed_config(template, plan, hidden_size=width, learning_rate=optim.learning_rate,
                            betas=optim.adam_betas, weight_decay=optim.weight_decay, eps=optim.adam_eps,
                            grad_clip=optim.grad_clip)


def build_model(config: TrainConfig, ds: dict, image_token_id: int) -> JanusProForTraining:
    """Built sharded under ZeRO-3 (each rank holds only its part), whole under ZeRO-1/2; then filled from --init."""
    # zero.Init shards parameters whatever the config's stage: ZeRO-2 would get ZeRO-3-partitioned weights.
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=ds["zero_optimization"].get("stage", 0) == 3):
        model = JanusProForTraining(model_config(config.model.model, image_token_id))
    if config.model.init:
        init = Path(config.model.init)
        # A previous stage's run directory is consolidated with DeepSpeed's utilities first.
        load_checkpoint(model, checkpoint.consolidate(init) if run_directory(init) else init)
    set_trainable(model, config.optim.trainable)
    use_attention(model, config.model.attention)
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_engine(config: TrainConfig, ds: dict, image_token_id: int):
    """The stage's own DeepSpeed engine: only trainable parameters reach the optimizer."""
    model = build_model(config, ds, image_token_id)
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds,
        lr_scheduler=lambda optimizer: lr_scheduler(optimizer, config.optim))
    return engine


def vq_fingerprint(model: JanusProForTraining) -> str:
    with deepspeed.zero.GatheredParameters(list(model.model.vqmodel.parameters())):
        return weights_fingerprint(model.model.vqmodel)
