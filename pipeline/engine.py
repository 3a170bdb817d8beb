"""Set-up of a stage: its model (built sharded, filled from --init) inside its own DeepSpeed engine.

Each stage is its own engine: which parameters train cannot change inside one.
"""

from __future__ import annotations

import copy
from pathlib import Path

import deepspeed
import torch
from transformers import JanusConfig

from model.janus import JanusProForTraining
from model.lora import inject, set_trainable_with_lora
from model.manifest import weights_fingerprint
from model.stages import set_trainable
from model.weights import load_checkpoint
from pipeline import checkpoint
from pipeline.attention import use_attention
from pipeline.config import TrainConfig
from pipeline.ds_config import BatchPlan, deepspeed_config
from pipeline.run_dir import is_run_directory
from pipeline.safe_load import use_weights_only_loads
from pipeline.schedule import lr_scheduler


def run_deepspeed_config(config: TrainConfig, plan: BatchPlan, janus: JanusConfig) -> dict:
    """--ds-config's template with this run's batch plan, bucket sizes for its model's width and its optimiser."""
    template = config.system.ds_config or ("zero3_bf16" if torch.cuda.is_available() else "zero3_cpu")
    optim = config.optim
    return deepspeed_config(template, plan, hidden_size=janus.text_config.hidden_size,
                            learning_rate=optim.learning_rate,
                            betas=optim.adam_betas, weight_decay=optim.weight_decay, eps=optim.adam_eps,
                            grad_clip=optim.grad_clip)


def build_model(config: TrainConfig, ds: dict, janus: JanusConfig, image_token_id: int) -> JanusProForTraining:
    """Built sharded under ZeRO-3 (each rank holds only its part), whole under ZeRO-1/2; then filled from --init,
    then given LoRA adapters (--lora-rank) whose parameters `deepspeed.initialize` makes ZeRO-3 ones."""
    janus = copy.deepcopy(janus)  # the resolved config stays as read
    janus.image_token_id = image_token_id
    # zero.Init shards parameters whatever the config's stage: ZeRO-2 would get ZeRO-3-partitioned weights.
    with deepspeed.zero.Init(config_dict_or_path=ds, enabled=ds["zero_optimization"].get("stage", 0) == 3):
        model = JanusProForTraining(janus)
    if config.model.init:
        init = Path(config.model.init)
        # A previous stage's run directory is consolidated with DeepSpeed's utilities first.
        load_checkpoint(model, checkpoint.consolidate(init) if is_run_directory(init) else init)
    lora = config.lora.settings()
    if lora is None:
        set_trainable(model, config.optim.trainable)
    else:  # after --init's weights: they load under their plain names, which adapting a layer changes
        inject(model, lora, seed=config.data.seed)
        set_trainable_with_lora(model, config.optim.trainable)
    use_attention(model, config.model.attention)
    if config.model.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_engine(config: TrainConfig, ds: dict, janus: JanusConfig, image_token_id: int):
    """The stage's own DeepSpeed engine: only trainable parameters reach the optimizer; under ZeRO-3 with
    `--frozen-weights persisted`, frozen parameters are marked persistent (see `persist_frozen`); its checkpoint
    files are loaded as data only (pipeline/safe_load.py)."""
    model = build_model(config, ds, janus, image_token_id)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    persist = config.system.frozen_weights == "persisted" and ds["zero_optimization"].get("stage", 0) == 3
    if persist:
        ds = with_frozen_live(ds, sum(p.ds_numel for p in frozen))
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=ds,
        lr_scheduler=lambda optimizer: lr_scheduler(optimizer, config.optim))
    use_weights_only_loads(engine)  # its own checkpoint engine unpickles whatever a file holds
    if persist:
        persist_frozen(frozen)
    return engine


def with_frozen_live(ds: dict, frozen: int) -> dict:
    """`stage3_max_live_parameters` raised by the persisted frozen elements: the coordinator counts every gathered
    element as live until it is released, so a persisted 7B LLM (Stage I) would use up the default 1e9 and stop
    the prefetcher in the step's first micro-batch."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = ds["zero_optimization"]
    live = zero.get("stage3_max_live_parameters", DeepSpeedZeroConfig().max_live_parameters)
    return {**ds, "zero_optimization": {**zero, "stage3_max_live_parameters": int(live) + frozen}}


def persist_frozen(frozen: list[torch.nn.Parameter]) -> None:
    """Keep frozen ZeRO-3 parameters whole from their first use in a step until the optimizer step.

    deepspeed 0.19.8's coordinator never releases a `ds_persist` parameter once its trace is recorded
    (`__params_to_release`, `release_backward_leftovers` and the recompute path skip it), so a frozen module is
    gathered in the step's first forward and not again in later micro-batches or in any backward. The optimizer
    step still partitions every parameter (`_partition_all_parameters` -> `release_and_reset_all` ignores
    `ds_persist`) and `_post_step` re-gathers only the threshold-persistent ones it listed at start, so these are
    gathered once per step, prefetched with the forward; under hpZ from their node copy, which
    `invalidate_secondary_tensor` never drops for frozen parameters: across nodes once per run. Checkpoints are
    unchanged (saving partitions everything first and each rank writes its partition), so save, resume and export
    work as under `partitioned`.

    Not built outside zero.Init instead: `deepspeed.initialize` converts every parameter of the engine's module to a
    ZeRO-3 parameter (`DeepSpeedZeRoOffload._convert_to_zero_parameters`), so they would be partitioned anyway;
    keeping them whole needs them outside the engine's module, and outside its checkpoints."""
    for param in frozen:
        param.ds_persist = True


def vq_fingerprint(model: JanusProForTraining) -> str:
    with deepspeed.zero.GatheredParameters(list(model.model.vqmodel.parameters())):
        return weights_fingerprint(model.model.vqmodel)
