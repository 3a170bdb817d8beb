"""pipeline/planning/: the --dry-run performance plan (gathers, collectives, report), its arithmetic, and the dry run.

In-process tests here; the ones that start processes or take long are in tests/integration/test_plan.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest

from model.config import preset_config
from model.stages import STAGES, Stage, stage_for
from pipeline.config import ConfigError, resolve
from pipeline.ds_config import DS_CONFIGS, MIN_BUCKET, zero_defaults, zero_sizes
from pipeline.metrics import training_flops
from pipeline.planning import dry_run
from pipeline.planning.collectives import (
    NETWORK_STEP_LATENCY,
    NVLINK_STEP_LATENCY,
    RING_BASE_LATENCY,
    Cluster,
    Collective,
    cluster_for,
)
from pipeline.planning.gathers import Unit, gathered_elements, module_units, trace
from pipeline.planning.hardware import GPUS, NIC_EFFICIENCY, Network
from pipeline.planning.memory import BF16, GIB, estimate_memory, param_counts, workload
from pipeline.planning.report import (
    PerformanceRow,
    expected_counts,
    format_performance_plan,
    performance_rows,
    recommended,
    recommended_template,
)

A100_256 = cluster_for("a100-80g", 32, 8)
SEVEN_B = zero_defaults(4096)  # the 7b's ZeRO sizes as the launchers fill zero3_bf16.json


def rows_of(model: str, stage: Stage, cluster: Cluster, **choices) -> list[PerformanceRow]:
    return performance_rows(workload(model, stage), cluster, **choices)


def unit(name: str, n: int, trains: bool = True, backward: bool = True, block: str | None = None) -> Unit:
    return Unit(name=name, elements=n, gathered=n, trainable=n if trains else 0, backward=backward, block=block)


def test_reuse_distance_keeps_the_last_forward_modules_for_the_backward():
    layers = [unit(f"l{i}", 100) for i in range(6)]
    # Nothing kept (no prefetch either): every module is gathered again in the backward.
    none_kept = gathered_elements(layers, reuse_distance=0, prefetch_bucket=0)
    assert (none_kept.forward, none_kept.backward) == (600, 600)
    assert none_kept.forward_calls == none_kept.backward_calls == 6
    # At release of l_i the rest of the trace is l_{i+1}..l5, then l5..l0: within 250 elements l4 and l5 reappear
    # (l5: its own backward is next; l4: l5 + l5 = 200 < 250 walked before it), so only l0..l3 are gathered again.
    kept = gathered_elements(layers, reuse_distance=250, prefetch_bucket=0)
    assert kept.backward == 400 and kept.backward_calls == 4
    # Everything within reach (deepspeed's default 1e9 on a small model): no backward gathers at all.
    assert gathered_elements(layers, reuse_distance=10 ** 9, prefetch_bucket=0).backward == 0
    assert gathered_elements(layers, reuse_distance=10 ** 9, prefetch_bucket=0).peak_held == 600


def test_the_prefetcher_keeps_what_it_has_read_past():
    """deepspeed's skip rule: a module whose later use the prefetcher already passed is not released."""
    layers = [unit(f"l{i}", 100) for i in range(6)]
    # A bucket as large as the model: at l0 the prefetcher gathers l1..l5 and reads on through the whole backward,
    # so nothing is released in the forward but l5, whose next use is the very next step (not "skipped").
    assert gathered_elements(layers, reuse_distance=0, prefetch_bucket=600).backward == 100
    # A one-module bucket reads one module ahead and never past a held module's later use: all gathered again.
    one = gathered_elements(layers, reuse_distance=0, prefetch_bucket=100)
    assert one.forward == 600 and one.backward == 600
    # stage3_max_live_parameters caps what it reads ahead: with 300 elements live at most, the same large bucket
    # stops after a few modules, and what it did not read past is gathered again (a 7B model against 1e9).
    capped = gathered_elements(layers, reuse_distance=0, prefetch_bucket=600, max_live=300)
    assert (capped.backward, capped.peak_held) == (500, 300)


def test_frozen_forward_only_modules_are_gathered_once_and_counted_as_frozen():
    units = [unit("siglip", 300, trains=False, backward=False), unit("l0", 100), unit("head", 50)]
    g = gathered_elements(units, reuse_distance=0, prefetch_bucket=0)
    assert (g.forward, g.backward, g.forward_frozen) == (450, 150, 300)


def test_persisted_frozen_modules_are_gathered_once_per_step_and_never_released():
    units = [unit("siglip", 300, trains=False, backward=False), unit("llm", 200, trains=False), unit("head", 50)]
    partitioned = gathered_elements(units, reuse_distance=0, prefetch_bucket=0)
    persisted = gathered_elements(units, reuse_distance=0, prefetch_bucket=0, persist_frozen=True)
    # Partitioned: each micro-batch gathers all three, then the LLM (a gradient flows through it) and the head again.
    assert (partitioned.forward, partitioned.backward, partitioned.frozen_once) == (550, 250, 0)
    # Persisted: the frozen ones once per step and never in a backward; only the head every micro-batch.
    assert (persisted.forward, persisted.backward) == (50, 50)
    assert (persisted.frozen_once, persisted.frozen_once_calls) == (500, 2)
    assert persisted.peak_held == 50  # the memory estimate holds the frozen ones whole instead


def test_the_plan_costs_and_recommends_persisted_frozen_weights():
    """7b Stage I on 4 x 8 H100: four micro-batches a step, each gathering the frozen 7B LLM forward (and part of
    it backward) when partitioned; persisted gathers it once a step and holds 13.4 GiB more per GPU."""
    cluster = cluster_for("h100", 4, 8)
    stage = stage_for(1, "7b")
    sizes = replace(SEVEN_B, reduce_bucket=MIN_BUCKET * 16, prefetch_bucket=MIN_BUCKET * 16)
    rows = rows_of("7b", stage, cluster, micro_batches=(2,), checkpointing=(False,), sizes=(sizes,))
    plain, persisted = (next(r for r in rows if r.setting.sharding == "zero3" and r.setting.frozen_weights == f)
                        for f in ("partitioned", "persisted"))
    assert plain.accumulation == persisted.accumulation == 4
    units = module_units(preset_config("7b"), tuple(stage.trainable), SEVEN_B.persistence_threshold, False)
    frozen = sum(u.gathered for u in units if not u.trainable)
    once = [(c, n) for c, n in persisted.collectives if c.what.startswith("frozen")]
    assert [(c.full_bytes, n) for c, n in once] == [(2 * frozen, 1)]
    assert persisted.comm_s < plain.comm_s / 3
    gathered = sum(c.full_bytes * n for c, n in plain.collectives if c.kind == "all-gather")
    assert gathered > 4 * 2 * frozen  # partitioned: every micro-batch, and again in backward
    # Memory: with the same gathers held, persisting costs the frozen weights whole on top, with the fragmentation
    # margin; the rows hold less gathered (persisted modules leave the trace's peak).
    assert persisted.memory.persisted_frozen == BF16 * persisted.memory.params.frozen_used > 13 * GIB
    assert persisted.memory.gathered_params < plain.memory.gathered_params
    work, peak = workload("7b", stage), plain.memory.gathered_params / BF16
    held = {f: estimate_memory(work, replace(plain.setting, frozen_weights=f), cluster.world, 8, peak).total
            for f in ("partitioned", "persisted")}
    assert held["persisted"] - held["partitioned"] == pytest.approx(1.1 * persisted.memory.persisted_frozen)
    # Across the whole plan, persisting moves less than partitioning for each sharding; recommended, it says how to
    # run it.
    every = rows_of("7b", stage, cluster)
    for sharding in ("zero3", "zero3-hpz"):
        least = {f: min(r.comm_s for r in every if r.setting.sharding == sharding and r.setting.frozen_weights == f)
                 for f in ("partitioned", "persisted")}
        assert least["persisted"] < least["partitioned"], sharding
    persisted_only = [r for r in every if r.setting.frozen_weights == "persisted"]
    assert recommended(persisted_only).fits
    assert "--frozen-weights persisted" in format_performance_plan(persisted_only, cluster, "Stage I 7b")
    config, _ = resolve(1, ["--model", "7b", "--frozen-weights", "persisted"])
    assert config.system.frozen_weights == "persisted"
    # ZeRO-2 keeps every weight whole (one row); Stage III has nothing frozen to gather (no persisted rows).
    assert {r.setting.frozen_weights for r in every if r.setting.sharding == "zero2"} == {"whole"}
    stage3 = rows_of("7b", stage_for(3, "7b"), cluster_for("a100-80g", 8, 8))
    assert stage3 and not any(r.setting.frozen_weights == "persisted" for r in stage3)


def test_checkpointed_layers_rerun_their_forward_in_the_backward_trace():
    units = [unit("a", 1, block="L0"), unit("b", 1, block="L0"), unit("head", 1)]
    order = [(u.name, backward) for u, backward in trace(units)]
    assert order == [("a", False), ("b", False), ("head", False), ("head", True),
                     ("a", True), ("b", True), ("b", True), ("a", True)]


def test_collective_bytes_and_seconds():
    """Bus bandwidth: NVLink's inside a node, the node's NIC aggregate across nodes; latency: NCCL's ring, network
    latency only for the steps that cross a node."""
    cluster = Cluster(GPUS["a100-80g"], nodes=2, gpus_per_node=8,
                      network=Network(nvlink_bus_bytes_per_s=125e9, nics_per_node=4, nic_gbps=100.0))
    across = 4 * 100e9 / 8 * NIC_EFFICIENCY  # 4 NICs of 100 Gb/s: 45 GB/s, not one NIC's 12.5
    gather = Collective("all-gather", "p", full_bytes=16e9, group=16, across_nodes=True, calls=0)
    assert gather.wire_bytes == pytest.approx(15e9)  # (g - 1) / g of the whole
    assert gather.seconds(cluster) == pytest.approx(15e9 / across)
    one_call = Collective("all-gather", "p", full_bytes=0.0, group=16, across_nodes=True, calls=1)
    assert one_call.seconds(cluster) == pytest.approx(RING_BASE_LATENCY + 14 * NVLINK_STEP_LATENCY
                                                      + 1 * NETWORK_STEP_LATENCY)  # 15 steps, one crosses
    in_node = Collective("all-reduce", "p", full_bytes=8e9, group=8, across_nodes=False, calls=10)
    assert in_node.wire_bytes == pytest.approx(14e9)  # an all-reduce is a reduce-scatter + an all-gather
    ring = RING_BASE_LATENCY + 2 * 7 * NVLINK_STEP_LATENCY
    assert in_node.seconds(cluster) == pytest.approx(14e9 / 125e9 + 10 * ring)
    assert Collective("all-gather", "p", 1e9, 1, False, 1).seconds(cluster) == 0.0
    # The GPU type's node by default: an A100 node's 8 x 200 Gb/s reach 180 GB/s; an H100 node's 8 x 400 Gb/s would
    # reach 360, and a ring across nodes also runs through NVLink: the lesser of the two.
    h100, a100 = cluster_for("h100", 4, 8).links, cluster_for("a100-80g", 4, 8).links
    assert a100.node_bytes_per_s == pytest.approx(180e9)
    assert h100.node_bytes_per_s == pytest.approx(min(360e9, h100.nvlink_bus_bytes_per_s))
    assert h100.node_bytes_per_s > 1.9 * a100.node_bytes_per_s


def test_module_units_follow_janus_forward_and_count_every_gathered_parameter():
    config = preset_config("1b")
    threshold = zero_defaults(2048).persistence_threshold
    units = module_units(config, STAGES[2].trainable, persistence_threshold=threshold, checkpointing=False)
    names = [u.name for u in units]
    assert names[0] == "model.language_model.embed_tokens" and names[-1].startswith("model.generation_head")
    assert names.index("lm_head") > names.index("model.language_model.norm")
    assert not any(n.startswith("model.vqmodel") for n in names)  # the VQ runs in preprocessing, not here
    siglip = [u for u in units if u.name.startswith("model.vision_model")]
    assert siglip and not any(u.backward or u.trainable for u in siglip)  # frozen, no gradient reaches it
    assert sum(u.trainable for u in units) == param_counts(config, STAGES[2].trainable).trainable
    norms = [u for u in units if u.name.endswith("layernorm")]
    assert norms and all(u.gathered == 0 for u in norms)  # 2048 elements <= the threshold: persistent


def test_7b_stage2_on_32_a100_nodes_recommends_a_plan_that_fits_at_40_percent_mfu():
    rows = rows_of("7b", stage_for(2, "7b"), A100_256)
    best = recommended(rows)
    assert best is not None and best.fits and best.available and best.mfu >= 0.40
    assert best.memory.total <= GPUS["a100-80g"].memory
    assert not any(r.setting.sharding == "mics" and r is best for r in rows)  # removed from deepspeed 0.19.8
    # Today's setting, ZeRO-3 with one row per micro-batch, is comm-bound: 35-40% MFU on nodes of 8 x 200 Gb/s NICs
    # (17% when every GPU had one NIC's bandwidth to itself).
    today = next(r for r in rows if r.setting.sharding == "zero3" and r.setting.micro_batch_rows == 1
                 and r.setting.checkpointing)
    assert today.comm_s > today.compute_s and 0.25 < today.mfu < 0.45
    # Per micro-batch it gathers the weights forward and (less what the coordinator keeps: the last ~1e9 elements
    # of the forward) backward, and reduce-scatters the trainable gradients: ~4.2 bytes per parameter, below the
    # issue's 6 (which re-gathers everything for the backward).
    per_micro_batch = sum(c.full_bytes * times for c, times in today.collectives) / today.accumulation
    assert 3.5 * 7.4e9 < per_micro_batch < 6 * 7.4e9
    # The days follow Table 2's steps; MFU and days come with the model's range around them.
    assert best.days == pytest.approx(270_000 * best.step_s / 86400)
    (mfu_low, mfu_high), (fast, slow) = best.mfu_range, best.days_range
    assert 0.45 < mfu_low < best.mfu < mfu_high < 0.75 and fast < best.days < slow
    assert slow == pytest.approx(270_000 * best.prediction.low.step_s / 86400)


def test_1b_and_other_stages_have_a_plan_that_fits():
    # Stage III's 128 rows on 16 nodes leave one row per GPU and every weight trains: comm-bound (~35%); on 8
    # nodes two rows per GPU hide it.
    for model, stage, nodes in (("1b", 2, 32), ("1b", 1, 32), ("7b", 1, 32), ("7b", 3, 8), ("1b", 3, 8)):
        cluster = cluster_for("a100-80g", nodes, 8)
        best = recommended(rows_of(model, stage_for(stage, model), cluster))
        assert best is not None and best.mfu >= 0.40, (model, stage, best)


def test_a_40gb_gpu_rules_out_zero2_without_checkpointing_for_the_7b():
    stage = stage_for(2, "7b")
    small = rows_of("7b", stage, cluster_for("a100-40g", 32, 8), checkpointing=(False,))
    big = rows_of("7b", stage, A100_256, checkpointing=(False,))
    # 14.8 GB of whole bf16 weights + 22 GiB of activations per row do not fit 40 GB; they fit 80 GB.
    assert not any(r.fits for r in small if r.setting.sharding == "zero2")
    assert any(r.fits for r in big if r.setting.sharding == "zero2")
    with_checkpointing = rows_of("7b", stage, cluster_for("a100-40g", 32, 8), checkpointing=(True,))
    assert any(r.fits for r in with_checkpointing if r.setting.sharding == "zero3")


def test_gradients_are_reduced_in_fp32_where_that_costs_no_step_time(tmp_path):
    from pipeline.ds_config import batch_plan, deepspeed_config

    def reduce_scatter_bytes(row) -> float:
        return sum(c.full_bytes * n for c, n in row.collectives if c.kind == "reduce-scatter")

    # Stage I trains only the adaptors and heads: their gradients are small, fp32 hides under compute (hpZ's best;
    # ZeRO-2's exposed last all-reduce, doubled, would cost it 0.1% of its step).
    stage1 = rows_of("7b", stage_for(1, "7b"), A100_256)
    best = recommended([r for r in stage1 if r.setting.sharding == "zero3-hpz"])
    assert best.setting.grad_bytes == 4 and best.comm_s <= best.compute_s
    twin = rows_of("7b", stage_for(1, "7b"), A100_256, micro_batches=(best.setting.micro_batch_rows,),
                   checkpointing=(best.setting.checkpointing,), sizes=(best.setting.zero,))
    assert all(r.setting.grad_bytes == 4 for r in twin if r.setting.sharding == best.setting.sharding)
    # Its bytes are fp32's: twice what the same gradients weigh in bf16.
    trainable = sum(u.trainable for u in module_units(preset_config("7b"), tuple(stage_for(1, "7b").trainable),
                                                       SEVEN_B.persistence_threshold, best.setting.checkpointing))
    assert reduce_scatter_bytes(best) == pytest.approx(4 * trainable * best.accumulation)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(recommended_template(best)))
    filled = deepspeed_config(path, batch_plan(256, 256, best.setting.micro_batch_rows), hidden_size=4096,
                              learning_rate=1e-3, betas=[0.9, 0.95], weight_decay=0.0, eps=1e-8, grad_clip=1.0)
    assert filled["communication_data_type"] == "fp32"
    # A ZeRO-2 plan: nothing stage-3-only is filled in (ZeRO-2 gathers and persists nothing).
    zero2 = next(r for r in stage1 if r.setting.sharding == "zero2")
    path.write_text(json.dumps(recommended_template(zero2)))
    filled = deepspeed_config(path, batch_plan(256, 256, zero2.setting.micro_batch_rows), hidden_size=4096,
                              learning_rate=1e-3, betas=[0.9, 0.95], weight_decay=0.0, eps=1e-8, grad_clip=1.0)
    assert filled["zero_optimization"]["stage"] == 2 and zero2.setting.frozen_weights == "whole"
    assert not [k for k in filled["zero_optimization"] if k.startswith("stage3_")]
    # Stage II's 7b with today's setting is communication-bound: fp32 gradients would add step time, so bf16.
    stage2 = next(r for r in rows_of("7b", stage_for(2, "7b"), A100_256, micro_batches=(1,), checkpointing=(True,),
                                      sizes=(SEVEN_B,)) if r.setting.sharding == "zero3"
                  and r.setting.frozen_weights == "partitioned")
    assert stage2.setting.grad_bytes == 2 and stage2.comm_s > stage2.compute_s
    assert "communication_data_type" not in recommended_template(stage2)
    assert all(r.comm_s <= r.compute_s for r in stage1 + [stage2] if r.setting.grad_bytes == 4)


def test_flops_are_metrics_formula_on_the_expected_micro_batch():
    stage = stage_for(2, "1b")
    row = next(r for r in rows_of("1b", stage, A100_256, micro_batches=(1,), checkpointing=(True,))
               if r.setting.sharding == "zero3")
    flops = training_flops(expected_counts(stage, 1), preset_config("1b"), stage.trainable, True)
    assert row.model_flops == pytest.approx(256 * 2 * flops.model)
    assert row.hardware_flops == pytest.approx(256 * 2 * flops.hardware)
    counts = expected_counts(stage, 1)
    assert counts.real_tokens == 4096 and counts.image_targets > 0 and counts.text_targets > 0


def test_dry_run_takes_the_cluster_flags():
    config, args = resolve(2, ["--model", "1b", "--nodes", "32", "--gpu", "h100", "--nic-gbps", "200"])
    text = dry_run(config, args.cluster, args.model_config)
    # Unset flags are the GPU type's typical node (8 NICs on an H100 node); a flag replaces only its own figure.
    assert "32 x 8 H100" in text and "8 x 200 Gb/s NICs per node" in text and "Recommended (*)" in text
    config, args = resolve(2, ["--model", "1b", "--nodes", "32", "--gpu", "a100-80g", "--nics-per-node", "1"])
    assert "1 x 200 Gb/s NICs per node" in dry_run(config, args.cluster, args.model_config)
    config, args = resolve(2, ["--model", "1b", "--nodes", "32", "--world-size", "128"])
    with pytest.raises(ConfigError, match="--world-size 128 is not --nodes 32"):
        dry_run(config, args.cluster, args.model_config)
    with pytest.raises(ConfigError, match="--gpu"):
        resolve(2, ["--model", "1b", "--gpu", "v100"])


def test_the_performance_plan_says_when_nothing_fits():
    cluster = cluster_for("a100-40g", 1, 8)
    rows = rows_of("7b", stage_for(2, "7b"), cluster, micro_batches=(64,), checkpointing=(False,))
    assert rows and not any(r.fits for r in rows)
    assert "No choice fits memory" in format_performance_plan(rows, cluster, "Stage II 7b")


def test_the_recommended_template_is_what_the_launchers_fill_in(tmp_path):
    from pipeline.ds_config import batch_plan, deepspeed_config

    rows = rows_of("7b", stage_for(2, "7b"), A100_256)
    best = recommended(rows)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(recommended_template(best)))
    filled = deepspeed_config(path, batch_plan(512, 256, best.setting.micro_batch_rows), hidden_size=4096,
                              learning_rate=1e-4, betas=[0.9, 0.95], weight_decay=0.0, eps=1e-8, grad_clip=1.0)
    zero = filled["zero_optimization"]
    # The plan's numbers survive; placeholders are still filled from the width.
    assert zero["reduce_bucket_size"] == best.setting.zero.reduce_bucket > SEVEN_B.reduce_bucket
    assert zero["stage3_param_persistence_threshold"] == SEVEN_B.persistence_threshold
    assert zero.get("zero_hpz_partition_size", 1) == (8 if best.setting.sharding == "zero3-hpz" else 1)
    assert filled["train_micro_batch_size_per_gpu"] == best.setting.micro_batch_rows
    # What the launchers run from it is what was costed.
    assert zero_sizes(zero, 4096) == best.setting.zero
    # A row costed with today's sizes is written with the prefetch bucket it was costed at.
    today = next(r for r in rows if r.setting.zero == SEVEN_B)
    zero = recommended_template(today)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"]) == (SEVEN_B.reduce_bucket,
                                                                                 SEVEN_B.prefetch_bucket)


# ---- the dry run: the run's own setting, costed by the one memory model ----

def table_total(text: str) -> float:
    """The memory table's "total (ours)", GiB."""
    return float(re.search(r"total \(ours\)\s+([\d.]+) GiB", text).group(1))


def plan_lines(text: str) -> list[list[str]]:
    """The plan table's rows, split: sharding, frozen, rows/mb, accum, ckpt, grads, bucket M, ..., GiB/GPU, note."""
    header = next(i for i, line in enumerate(text.splitlines()) if line.startswith("  sharding "))
    rows = []
    for line in text.splitlines()[header + 1:]:
        if not line.startswith(("* ", "  ")):
            break
        rows.append(line[2:].split())
    return rows


@pytest.mark.parametrize("stage, flags", [(2, ["--model", "7b"]), (1, ["--model", "1b", "--gradient-checkpointing"])])
def test_the_memory_table_totals_what_the_plan_row_of_the_same_setting_costs(stage, flags):
    """One memory model: the dry run's table (the run's setting: ZeRO-3, its rows per micro-batch and checkpointing,
    today's buckets, partitioned) totals the GiB of the plan's row with that setting. They were two near-copies
    that counted gathered parameters and buckets apart: 32.6 vs 33.9 GiB for the 7b."""
    config, args = resolve(stage, [*flags, "--world-size", "256"])
    text = dry_run(config, args.cluster, args.model_config)
    bucket = zero_defaults(4096 if "7b" in flags else 2048).reduce_bucket
    ckpt = "on" if config.model.gradient_checkpointing else "off"
    row = next(r for r in plan_lines(text) if r[:7] == ["zero3", "partitioned", "1", r[3], ckpt, "bf16",
                                                        f"{bucket / 1e6:.1f}"])
    assert table_total(text) == pytest.approx(float(row[13]), abs=0.051)  # 0.01-GiB table, 0.1-GiB plan
    assert "this run" not in text  # marked only for a --ds-config


def test_a_ds_config_is_what_the_dry_run_costs(tmp_path):
    """--ds-config's buckets, hpZ group, max live parameters and gradient dtype are costed in the memory table and as
    the plan's row marked for this run; the plan's alternatives stay as they were."""
    template = json.loads((DS_CONFIGS / "zero3_bf16.json").read_text())
    template["zero_optimization"].update(reduce_bucket_size=5e8, zero_hpz_partition_size=8,
                                         stage3_max_live_parameters=3e8)
    template["communication_data_type"] = "fp32"
    (tmp_path / "mine.json").write_text(json.dumps(template))
    plain_config, args = resolve(2, ["--model", "7b", "--world-size", "256"])
    plain = dry_run(plain_config, args.cluster, args.model_config)
    config, args = resolve(2, ["--model", "7b", "--world-size", "256", "--ds-config", str(tmp_path / "mine.json")])
    text = dry_run(config, args.cluster, args.model_config)

    def line(label: str, of: str) -> float:
        return float(re.search(rf"{re.escape(label)}\s+([\d.]+) GiB", of).group(1))

    assert "ZeRO-3 hpZ memory per GPU" in text and "ZeRO-3 memory per GPU" in plain
    assert line("reduce buckets (fp32)", text) == pytest.approx(2 * 4 * 5e8 / GIB, abs=0.005)
    params = workload("7b", stage_for(2, "7b")).params
    assert line("weights (bf16, all)", text) == pytest.approx(2 * params.total * (1 / 256 + 1 / 8) / GIB, abs=0.005)
    assert line("CUDA context + NCCL", text) == 2.0  # hpZ's second communicator
    assert line("gathered params (bf16)", text) < line("gathered params (bf16)", plain)  # max live 3e8, not 1e9
    marked = [r for r in plan_lines(text) if r[-3:] == ["this", "run", "(--ds-config)"]]
    assert [r[:7] for r in marked] == [["zero3-hpz", "partitioned", "1", "2", "off", "fp32", "500.0"]]
    assert table_total(text) == pytest.approx(float(marked[0][13]), abs=0.051) and table_total(text) != table_total(
        plain)
    assert [r for r in plan_lines(text) if r not in marked] == plan_lines(plain)
    # ZeRO-2 from the template's stage; ZeRO-1 is not costed.
    template["zero_optimization"]["stage"] = 2
    (tmp_path / "mine.json").write_text(json.dumps(template))
    assert "ZeRO-2 memory per GPU" in dry_run(config, args.cluster, args.model_config)
    template["zero_optimization"]["stage"] = 1
    (tmp_path / "mine.json").write_text(json.dumps(template))
    with pytest.raises(ConfigError, match="ZeRO stage 1"):
        dry_run(config, args.cluster, args.model_config)


def test_the_recommended_template_and_flags_are_costed_as_the_recommended_row(tmp_path):
    config, args = resolve(2, ["--model", "7b", "--world-size", "256"])
    text = dry_run(config, args.cluster, args.model_config)
    run_it = next(x for x in text.splitlines() if x.startswith("  run it: "))
    flags, template = run_it.removeprefix("  run it: ").split(" --ds-config FILE, FILE holding ")
    (tmp_path / "recommended.json").write_text(template)
    config, args = resolve(2, ["--model", "7b", "--world-size", "256", *flags.split(),
                               "--ds-config", str(tmp_path / "recommended.json")])
    text = dry_run(config, args.cluster, args.model_config)
    marked = [x for x in text.splitlines() if x.endswith("this run (--ds-config)")]
    assert len(marked) == 1 and marked[0].startswith("* ")  # recommended, and what this run costs
    assert table_total(text) == pytest.approx(float(marked[0].split()[14]), abs=0.051)


def test_zero_sizes_are_the_templates_numbers_else_the_widths_defaults():
    zero = json.loads((DS_CONFIGS / "zero3_bf16.json").read_text())["zero_optimization"]
    assert zero_sizes(zero, 4096) == SEVEN_B  # placeholders, and max live / reuse distance at DeepSpeed's defaults
    set_here = {**zero, "reduce_bucket_size": 5e8, "stage3_param_persistence_threshold": 100}
    assert zero_sizes(set_here, 4096) == replace(SEVEN_B, reduce_bucket=500_000_000, persistence_threshold=100)
    zero2 = {"stage": 2, "reduce_bucket_size": "filled from the model width"}
    assert zero_sizes(zero2, 2048) == zero_defaults(2048)
