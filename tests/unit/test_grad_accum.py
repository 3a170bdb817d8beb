"""fp32 gradient accumulation when a step has more than one micro-batch (issue 25, 3): the filled DeepSpeed config.
The 2-rank bf16 ZeRO-3 run through it is tests/integration/test_grad_accum.py."""

import json

import pytest

from pipeline.ds_config import BatchPlan, deepspeed_config

NUMBERS = {"hidden_size": 64, "learning_rate": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.0, "eps": 1e-8,
           "grad_clip": 1.0}


def filled(template, accumulation_steps: int) -> dict:
    return deepspeed_config(template, BatchPlan(8 * accumulation_steps, 8, 1, accumulation_steps), **NUMBERS)


@pytest.mark.parametrize("template", ["zero3_bf16", "zero3_offload", "zero3_cpu"])
def test_more_than_one_micro_batch_accumulates_in_fp32(template):
    assert filled(template, 2)["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in filled(template, 1)  # nothing to accumulate: no fp32 buffer to pay for


def test_a_template_that_names_the_accumulation_dtype_keeps_it(tmp_path):
    own = tmp_path / "own.json"
    own.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3},
                               "data_types": {"grad_accum_dtype": "bf16"}}))
    assert filled(own, 4)["data_types"] == {"grad_accum_dtype": "bf16"}
