"""Three-stage training on 2 CPU ranks (DS_ACCELERATOR=cpu, gloo), tiny model, real shards.

In-process tests here; the ones that start processes or take long are in tests/integration/test_training.py.
"""

import subprocess
import sys

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from model.stages import STAGES, part_of
from pipeline.schedule import lr_factor


def test_lr_schedule_is_linear_warmup_then_constant():
    for stage in (1, 2, 3):
        table = STAGES[stage]
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=table.learning_rate)
        sched = LambdaLR(opt, lambda s, w=table.warmup_steps: lr_factor(s, w))
        seen = {}
        for step in range(table.warmup_steps + 3):
            seen[step] = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
        w = table.warmup_steps
        if w:
            assert seen[0] == pytest.approx(table.learning_rate / w)
        assert seen[max(w - 1, 0)] == pytest.approx(table.learning_rate)  # warm-up ends at the stage's rate
        assert seen[w + 2] == pytest.approx(table.learning_rate)          # and stays there
    assert STAGES[3].warmup_steps == 0 and lr_factor(0, 0) == 1.0


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_lr_decay_warms_up_then_falls_to_zero_at_decay_steps(style):
    factors = [lr_factor(s, 10, style, 110) for s in range(120)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10] == 1.0 and factors[60] == pytest.approx(0.5)  # halfway for both styles
    assert all(a > b for a, b in zip(factors[10:110], factors[11:111], strict=True))
    assert factors[110:] == [0.0] * 10
    assert (factors[35] > 0.75) == (style == "cosine")  # cosine stays high longer
    with pytest.raises(ValueError, match="lr_decay_style"):
        lr_factor(20, 10, "step", 110)


def test_stage1_gradients_flow_through_the_frozen_llm_with_checkpointing(tiny_model, special, shard_corpus):
    from model.batch import pack_rows
    from model.stages import set_trainable
    from pipeline.data.reader import Source, SourceSpec

    rows = [[Source(SourceSpec(str(shard_corpus[t])), 0, 1, seed=0).sample(0)] for t in ("understanding",
                                                                                         "generation")]
    set_trainable(tiny_model, STAGES[1].trainable)
    tiny_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.train()
    try:
        out = tiny_model(pack_rows(rows, 1400, special))
        (out.loss_sum.sum() / out.target_count.sum()).backward()
        for name, p in tiny_model.named_parameters():
            if part_of(name) in ("und_adaptor", "gen_adaptor", "gen_embedding"):  # upstream of the frozen LLM
                assert p.grad is not None and p.grad.abs().sum() > 0, name
            if part_of(name) == "llm":
                assert p.grad is None
    finally:
        tiny_model.activation_checkpointing_disable()
        tiny_model.eval().zero_grad(set_to_none=True)
        for p in tiny_model.parameters():
            p.requires_grad_(True)


def test_step_loss_is_the_global_token_mean():
    from pipeline.loss import step_loss

    counts = torch.tensor([10.0, 0.0, 30.0])
    halves = [torch.tensor([4.0, 0.0, 9.0]), torch.tensor([6.0, 0.0, 21.0])]  # two micro-batches' loss sums
    ones = torch.ones(3)
    assert sum(step_loss(h, counts, ones, "token") for h in halves) == pytest.approx(40.0 / 40.0)
    per_task = sum(step_loss(h, counts, ones, "task") for h in halves)
    assert per_task == pytest.approx((10.0 / 10 + 30.0 / 30) / 2)  # the absent text task is not averaged in
    weighted = sum(step_loss(h, counts, torch.tensor([2.0, 1.0, 1.0]), "token") for h in halves)
    assert weighted == pytest.approx((2 * 10.0 + 30.0) / (2 * 10 + 30))


def test_bucket_sizes_follow_the_width_above_a_floor():
    from pipeline.ds_config import MIN_BUCKET, batch_plan, deepspeed_config

    def zero(width: int) -> dict:
        return deepspeed_config("zero3_bf16", batch_plan(512, 256, 1), hidden_size=width, learning_rate=1e-4,
                                betas=[0.9, 0.95], weight_decay=0.0, eps=1e-8, grad_clip=1.0)["zero_optimization"]

    assert zero(4096)["reduce_bucket_size"] == 4096 * 4096  # 7b: transformers' "auto" values
    assert zero(4096)["stage3_prefetch_bucket_size"] == int(0.9 * 4096 * 4096)
    assert zero(64)["reduce_bucket_size"] == zero(64)["stage3_prefetch_bucket_size"] == MIN_BUCKET  # tiny
    assert zero(64)["stage3_param_persistence_threshold"] == 640  # small tensors stay partitioned in tests


def test_watchdog_exits_nonzero_with_stacks_when_no_step_completes():
    code = "import time\nfrom pipeline.monitor import Watchdog\nWatchdog(1.0)\ntime.sleep(30)\n"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3
    assert "no step completed in 1s" in done.stderr and "Thread" in done.stderr  # faulthandler's stack dump
