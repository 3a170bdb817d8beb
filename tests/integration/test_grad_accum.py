"""Two bf16 micro-batches per step equal one batch of both under ZeRO-3 on 2 CPU ranks (issue 25, 3).

The micro-batches' gradients are 1/2 and 2^-10 (DeepSpeed divides each by the 2 accumulation steps): their sum
needs more bits than bf16's 8, so accumulated in bf16 the second is lost (0.5), in fp32 it is kept (0.5 + 2^-10),
which is the gradient of one batch of both rows. The config is the zero3_bf16 template as pipeline.ds_config fills
it; DeepSpeed's CPU accelerator runs bf16.
"""

import json

import pytest

from tests.support import run_ranks

pytestmark = pytest.mark.integration

RANK = r'''
import json, sys
import deepspeed, torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from pipeline.ds_config import BatchPlan, deepspeed_config

deepspeed.init_distributed(dist_backend="gloo")
world = dist.get_world_size()
ds = deepspeed_config("zero3_bf16", BatchPlan(2 * world, world, 1, 2), hidden_size=4, learning_rate=0.0,
                      betas=[0.9, 0.999], weight_decay=0.0, eps=1e-8, grad_clip=0.0)
with deepspeed.zero.Init(config_dict_or_path=ds):
    model = torch.nn.Linear(4, 1, bias=False)
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
for x in (1.0, 2.0 ** -9):  # every rank the same rows: the average over ranks is exact
    engine.backward(engine(torch.full((1, 4), x, dtype=torch.bfloat16)).float().sum())
    if engine.is_gradient_accumulation_boundary():
        grad = safe_get_full_grad(engine.module.weight)
    engine.step()
if dist.get_rank() == 0:
    with open(sys.argv[1], "w") as f:
        json.dump({"grad": grad.flatten().tolist(), "model_dtype": str(engine.get_data_types()[0]),
                   "accumulation_dtype": str(engine.optimizer.gradient_accumulation_dtype),
                   "buffer_dtype": str(engine.optimizer.grad_partitions_flat_buffer.dtype)}, f)
dist.barrier()
dist.destroy_process_group()
'''


def test_two_bf16_micro_batches_equal_one_batch_of_both(tmp_path):
    out = tmp_path / "grad.json"
    run_ranks(["-c", RANK, str(out)], world_size=2, timeout=300)
    got = json.loads(out.read_text())
    # One batch of both rows, in fp32: the mean loss's gradient is the rows' mean, (1 + 2^-9) / 2 per weight.
    assert got["grad"] == [(1 + 2.0 ** -9) / 2] * 4
    assert got["model_dtype"] == "torch.bfloat16"
    assert got["accumulation_dtype"] == got["buffer_dtype"] == "torch.float32"
