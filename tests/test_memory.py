"""pipeline/memory.py: the --dry-run estimate, checked against arithmetic written out here and one measurement."""

from __future__ import annotations

import pytest
import torch

from model.config import preset_config
from model.janus import JanusProForTraining
from model.stages import STAGES
from model.summary import meta_model, parameter_counts
from pipeline.planning.memory import (
    GIB,
    estimate_memory,
    format_dry_run,
    llm_layer_activation_bytes,
    nodes_and_gpus,
    param_counts,
    row_mix,
)


@pytest.fixture(scope="module")
def seven_b():
    """7B at world 256 (32 nodes x 8), one 4096-token row per micro-batch, Stages I and II, checkpointing on."""
    return {s: estimate_memory("7b", STAGES[s], world_size=256, micro_batch_rows=1) for s in (1, 2)}


def test_7b_stage2_at_256_gpus_is_sane(seven_b):
    est = seven_b[2]
    # Floor: ZeRO-3 still gathers the 102,400 x 4096 LM head / embedding whole (0.78 GiB bf16) and checkpointing
    # keeps 30 layer inputs of 4096 x 4096 bf16 (0.94 GiB): more than 2 GiB. Ceiling: the paper trained the 7B on
    # A100-40GB, so the same setup must fit in 40 GB with room for CUDA/NCCL.
    assert 2 * GIB < est.total < 36e9
    # Model states at 256-way sharding are small: 2 B x 7.4 B + 14 B x 7.0 B over 256 is ~0.44 GB.
    assert est.model_states == pytest.approx((2 * 7.408e9 + 14 * 7.032e9) / 256, rel=0.01)
    # Without checkpointing, activations are 30 layers x 4096 tokens x (26 D + 8 I) B = 22.3 GiB: between
    # Korthikanti's 34 D per layer (16 GiB) and twice that.
    assert 16 * GIB < est.activations_full < 32 * GIB
    assert est.params.largest_module == 102_400 * 4096


def test_stage1_needs_far_less_optimizer_memory(seven_b):
    one, two = seven_b[1], seven_b[2]
    assert one.params.total == two.params.total and one.weights == two.weights  # ZeRO-3 shards frozen ones too
    assert one.optimizer < two.optimizer / 40  # 0.12 B vs 7.0 B trainable parameters
    assert one.optimizer == pytest.approx(14 * one.params.trainable / 256)


def test_checkpointing_reduces_activations(seven_b):
    est = seven_b[2]
    assert est.activations == est.activations_checkpointed
    assert est.activations_checkpointed < est.activations_full / 8
    off = estimate_memory("7b", STAGES[2], world_size=256, checkpointing=False)
    assert off.activations == off.activations_full and off.total > est.total + 15 * GIB
    # Stage III trains SigLIP: its activations add to the LLM's.
    three = estimate_memory("7b", STAGES[3], world_size=128, checkpointing=False)
    assert three.activations_full > off.activations_full


def test_deepspeed_estimate_is_reported_and_larger_when_most_params_are_frozen(seven_b):
    est = seven_b[1]
    p = est.params
    # deepspeed 0.19.8, no offload, zero_init: 4 B x largest layer + 18 B x all parameters / GPUs.
    assert est.deepspeed_gpu == 4 * p.largest_module + int(18 * p.total / 256)
    assert "32 nodes, 8 GPUs per node" in est.deepspeed_table and "offload_optimizer=none" in est.deepspeed_table
    ours_same_scope = est.model_states + 4 * p.largest_module
    assert est.deepspeed_gpu > ours_same_scope
    assert 18 * p.total / 256 > 5 * est.model_states  # it counts optimizer states for 7.4 B, we for 0.12 B
    table = format_dry_run(est)
    assert "DeepSpeed all-trainable" in table and "activations, ckpt off" in table and "Adam" in table


def test_param_counts_match_summary():
    counts = parameter_counts(meta_model("1b"))
    p = param_counts("1b", STAGES[2].trainable)
    assert p.total == sum(counts.values())
    assert p.trainable == sum(n for part, n in counts.items() if part in STAGES[2].trainable)


def test_row_mix_follows_the_ratio():
    gen_only = row_mix((0, 0, 1), 4096)
    assert gen_only.text_targets == 0 and gen_only.image_targets == pytest.approx(4096 * 576 / 590)
    stage1 = row_mix(STAGES[1].ratio, 4096)
    assert stage1.und_images == pytest.approx(4096 / (650 + 3 * 590))
    assert stage1.image_targets > 10 * stage1.text_targets  # Stage I: no text data, answers only


def test_nodes_and_gpus():
    assert nodes_and_gpus(256) == (32, 8) and nodes_and_gpus(4) == (1, 4)
    with pytest.raises(ValueError):
        nodes_and_gpus(12)


def test_llama_layer_activation_bytes_match_what_autograd_saves():
    """Bytes one bf16 decoder layer saves for backward, counted by a saved-tensors hook (unique storages, without
    the weights, the layer input and RoPE's cos/sin), within 10% of 26*D + 8*I."""
    config = preset_config("tiny")
    model = JanusProForTraining(config).to(torch.bfloat16).train()
    lm, T = model.model.language_model, 256
    x = torch.randn(1, T, config.text_config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    positions = torch.arange(T)[None]
    rope = lm.rotary_emb(x, positions)
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        lm.layers[0](x, attention_mask=None, position_ids=positions, position_embeddings=rope)
    skip = {p.untyped_storage().data_ptr() for p in lm.layers[0].parameters()}
    skip |= {t.untyped_storage().data_ptr() for t in (x, *rope)}
    measured = sum(n for ptr, n in saved.items() if ptr not in skip) / T
    assert measured == pytest.approx(llm_layer_activation_bytes(config), rel=0.10)


def test_persisted_frozen_weights_are_counted_whole():
    """--frozen-weights persisted: every frozen parameter the training forward uses, whole in bf16 on every GPU
    (Stage I 7b: the LLM, LM head and SigLIP; not the VQ, which runs in preprocessing, nor SigLIP's unused head)."""
    partitioned = estimate_memory("7b", STAGES[1], world_size=256)
    persisted = estimate_memory("7b", STAGES[1], world_size=256, frozen_weights="persisted")
    meta = meta_model("7b")
    p = persisted.params
    unused = sum(x.numel() for n, x in meta.named_parameters() if n.startswith(("model.vqmodel.",
                                                                                 "model.vision_model.head.")))
    assert unused > 0 and persisted.persisted_frozen == 2 * (p.total - p.trainable - unused)
    assert 13 * GIB < persisted.persisted_frozen < 14 * GIB and partitioned.persisted_frozen == 0
    assert persisted.total - partitioned.total == pytest.approx(1.1 * persisted.persisted_frozen)
    assert "frozen weights, whole" in format_dry_run(persisted)
    # Stage III trains everything the forward uses: nothing frozen to hold.
    assert estimate_memory("7b", STAGES[3], world_size=128, frozen_weights="persisted").persisted_frozen == 0
