"""pipeline/planning/memory.py: the memory model, checked against arithmetic written out here and one measurement."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from model.config import preset_config
from model.janus import JanusProForTraining
from model.stages import STAGES, Stage
from model.summary import meta_model, parameter_counts
from pipeline.ds_config import zero_defaults
from pipeline.planning.gathers import setting_gathers
from pipeline.planning.memory import (
    BF16,
    FP32,
    GIB,
    MemoryEstimate,
    Setting,
    deepspeed_estimate,
    estimate_memory,
    format_memory,
    llm_layer_activation_bytes,
    nodes_and_gpus,
    param_counts,
    row_mix,
    workload,
)


def memory(model: str, stage: Stage, world: int, **setting) -> MemoryEstimate:
    """`estimate_memory` of a setting (unless told: ZeRO-3, one row, checkpointing, the width's ZeRO sizes), holding
    what its gather trace holds at most."""
    work = workload(model, stage)
    chosen = Setting(**{"sharding": "zero3", "micro_batch_rows": 1, "checkpointing": True,
                        "zero": zero_defaults(work.config.text_config.hidden_size), **setting})
    return estimate_memory(work, chosen, world, 8, setting_gathers(work, chosen)[1].peak_held)


@pytest.fixture(scope="module")
def seven_b():
    """7B at world 256 (32 nodes x 8), one 4096-token row per micro-batch, Stages I and II, checkpointing on."""
    return {s: memory("7b", STAGES[s], 256) for s in (1, 2)}


def test_7b_stage2_at_256_gpus_is_sane(seven_b):
    est = seven_b[2]
    # Floor: ZeRO-3 still gathers the 102,400 x 4096 LM head / embedding whole (0.78 GiB bf16) and checkpointing
    # keeps 30 layer inputs of 4096 x 4096 bf16 (0.94 GiB): more than 2 GiB. Ceiling: the paper trained the 7B on
    # A100-40GB, so the same setup must fit in 40 GB with room for CUDA/NCCL.
    assert 2 * GIB < est.total < 36e9
    # Model states at 256-way sharding are small: 2 B x 7.4 B + 16 B x 7.0 B over 256 is ~0.50 GB (the gradients
    # in fp32: 512 rows on 256 ranks are two micro-batches, accumulated in fp32).
    assert est.gradient_element == FP32
    assert est.model_states == pytest.approx((2 * 7.408e9 + 16 * 7.032e9) / 256, rel=0.01)
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
    off = memory("7b", STAGES[2], 256, checkpointing=False)
    assert off.activations == off.activations_full and off.total > est.total + 15 * GIB
    # Stage III trains SigLIP: its activations add to the LLM's.
    three = memory("7b", STAGES[3], 128, checkpointing=False)
    assert three.activations_full > off.activations_full


def test_deepspeed_estimate_is_reported_and_larger_when_most_params_are_frozen(seven_b):
    est = seven_b[1]
    p = est.params
    # deepspeed 0.19.8, no offload, zero_init: 4 B x largest layer + 18 B x all parameters / GPUs.
    deepspeed_gpu, deepspeed_table = deepspeed_estimate(p.total, p.largest_module, 256)
    assert deepspeed_gpu == 4 * p.largest_module + int(18 * p.total / 256)
    assert "32 nodes, 8 GPUs per node" in deepspeed_table and "offload_optimizer=none" in deepspeed_table
    ours_same_scope = est.model_states + 4 * p.largest_module
    assert deepspeed_gpu > ours_same_scope
    assert 18 * p.total / 256 > 5 * est.model_states  # it counts optimizer states for 7.4 B, we for 0.12 B
    table = format_memory(est, deepspeed_gpu, deepspeed_table)
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
    # The same gathers held (persisting also takes the frozen modules out of the trace's peak: see test_plan.py).
    work = workload("7b", STAGES[1])
    partitioned_setting = Setting("zero3", 1, True, zero_defaults(4096))
    partitioned = estimate_memory(work, partitioned_setting, 256, 8, gathered_peak=0)
    persisted = estimate_memory(work, replace(partitioned_setting, frozen_weights="persisted"), 256, 8, 0)
    meta = meta_model("7b")
    p = persisted.params
    unused = sum(x.numel() for n, x in meta.named_parameters() if n.startswith(("model.vqmodel.",
                                                                                 "model.vision_model.head.")))
    assert unused > 0 and persisted.persisted_frozen == 2 * (p.total - p.trainable - unused)
    assert 13 * GIB < persisted.persisted_frozen < 14 * GIB and partitioned.persisted_frozen == 0
    assert persisted.total - partitioned.total == pytest.approx(1.1 * persisted.persisted_frozen)
    assert "frozen weights, whole" in format_memory(persisted, 0, "")
    # Stage III trains everything the forward uses: nothing frozen to hold.
    assert memory("7b", STAGES[3], 128, frozen_weights="persisted").persisted_frozen == 0


def test_memory_counts_the_worst_row_and_the_full_head_gradients(seven_b):
    est = seven_b[2]
    # One all-text row has 8 B x 4096 x 102,400 = 3.1 GiB of logits at once, but the loss runs 256 MiB chunks of them.
    assert est.worst_logits == 4 * 256 * 2**20 < 8 * 4096 * 102_400
    assert est.head_gradients == 2 * 102_400 * 4096
    assert est.total > (est.model_states + est.activations + est.worst_logits + est.head_gradients) * 1.1
    assert seven_b[1].head_gradients == 0  # neither the embedding nor the LM head trains in Stage I


def test_gathered_parameters_are_the_gather_traces_peak(seven_b):
    """What ZeRO-3 holds gathered is the most the coordinator's walk holds at once (prefetched modules, and the last
    ones of the forward kept for the backward), not the largest module and two prefetched layers: for the 7b that
    guess (1.5 GiB) fell 1.1 GiB short."""
    est = seven_b[2]
    work = workload("7b", STAGES[2])
    _, gathers = setting_gathers(work, est.setting)
    assert est.gathered_params == BF16 * gathers.peak_held
    p = est.params
    assert est.gathered_params > BF16 * (p.largest_module + 2 * p.decoder_layer) + GIB


def test_each_sharding_holds_its_own_weights_buckets_and_communicators(seven_b):
    zero3 = seven_b[2]
    p, bucket = zero3.params, zero3.setting.zero.reduce_bucket
    hpz = memory("7b", STAGES[2], 256, sharding="zero3-hpz", hpz=8)
    mics = memory("7b", STAGES[2], 256, sharding="mics")
    zero2 = memory("7b", STAGES[2], 256, sharding="zero2", frozen_weights="whole")
    fp32 = memory("7b", STAGES[2], 256, grad_bytes=FP32)
    # Two reduce buckets in the gradients' communication dtype.
    assert zero3.reduce_buckets == 2 * BF16 * bucket and fp32.reduce_buckets == 2 * FP32 * bucket
    # hpZ: a second bf16 copy of every weight over its group, and a second NCCL communicator.
    assert hpz.weights - zero3.weights == pytest.approx(BF16 * p.total / 8)
    assert (zero3.communicators, hpz.communicators, mics.communicators) == (1, 2, 2)
    # MiCS shards over the node; ZeRO-2 keeps every weight whole, gathers nothing, and its gradients stay bf16 (two
    # micro-batches a step: ZeRO-3 accumulates them in fp32).
    assert mics.optimizer == pytest.approx(zero3.optimizer * 256 / 8)
    assert zero2.weights == BF16 * p.total and zero2.gathered_params == 0
    assert zero2.optimizer == pytest.approx(zero3.optimizer - (FP32 - BF16) * p.trainable / 256)
