"""One optimizer step through the real engine set-up, on explicit rows: each rank takes its share of 4 rows
as micro-batches of `rows_per_micro_batch` rows. Rank 0 writes every trainable parameter after the step.
With "poison_first", a step whose images are all NaN comes first: it must be skipped and change nothing.

    python tests/ranks/train_step_equivalence.py ARGS_JSON   (under tests.support.run_ranks)
"""

import json
import sys
from dataclasses import replace

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from model.batch import pack_rows
from model.tokenizer import SpecialTokens, load_tokenizer
from pipeline.config import resolve
from pipeline.data import DataPipeline
from pipeline.ds_config import batch_plan
from pipeline.engine import build_engine, run_deepspeed_config
from pipeline.train import optimizer_step

args = json.loads(sys.argv[1])
deepspeed.init_distributed(dist_backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
config, invocation = resolve(2, args["flags"])
special = SpecialTokens.from_tokenizer(load_tokenizer(config.model.tokenizer))
plan = batch_plan(config.optim.rows_per_step, world, config.data.rows_per_micro_batch)
janus = invocation.model_config
engine = build_engine(config, run_deepspeed_config(config, plan, janus), janus, special.image_placeholder)

# The same 4 rows on every run, planned once on one "rank"; this rank's share, in micro-batches.
planner = DataPipeline(replace(config.data, rows_per_micro_batch=4, pad_rows=True, guidance_dropout=0.0), special)
rows = planner.plan_micro_batch()
mine = rows[rank * len(rows) // world:(rank + 1) * len(rows) // world]
micro = [pack_rows(mine[i:i + plan.rows_per_micro_batch], config.data.seq_len, special)
         for i in range(0, len(mine), plan.rows_per_micro_batch)]
assert len(micro) == plan.accumulation_steps
weights = torch.tensor(config.optim.task_loss_weights)
if args.get("poison_first"):
    poisoned = [replace(b, pixel_values=torch.full_like(b.pixel_values, float("nan"))) for b in micro]
    _, _, applied = optimizer_step(engine, poisoned, weights, config.optim.loss_normalisation)
    assert not applied and engine.skipped_steps == 1
loss_sums, counts, applied = optimizer_step(engine, micro, weights, config.optim.loss_normalisation)
assert applied
params = {}
for name, p in engine.module.named_parameters():
    if p.requires_grad:
        with deepspeed.zero.GatheredParameters([p]):
            params[name] = p.detach().clone()
if rank == 0:
    save_file(params, args["out"])
    print(f"loss {(loss_sums.sum() / counts.sum()).item():.6f}")
# Leave together: a rank that exits while its peer still talks to it can abort in gloo's teardown.
dist.barrier()
dist.destroy_process_group()
