"""Optimizer steps through the real engine with DeepSpeed's comms logger on; rank 0 prints the bytes each kind of
collective logged per step, counted over every step after the first (which records ZeRO-3's module trace), and
every step's loss.

    python tests/ranks/comms_bytes.py ARGS_JSON   (under tests.support.run_ranks)

ARGS_JSON: {"stage": N, "flags": [...], "steps": N}; the flags name a --ds-config whose JSON enables comms_logger.
"""

import json
import sys
from dataclasses import replace

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.comm.comm import comms_logger

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
config, invocation = resolve(args["stage"], args["flags"])
special = SpecialTokens.from_tokenizer(load_tokenizer(config.model.tokenizer))
plan = batch_plan(config.optim.rows_per_step, world, config.data.rows_per_micro_batch)
ds = run_deepspeed_config(config, plan, invocation.model_config)
assert ds.get("comms_logger", {}).get("enabled"), "the --ds-config template must enable comms_logger"
engine = build_engine(config, ds, invocation.model_config, special.image_placeholder)
weights = torch.tensor(config.optim.task_loss_weights)
per_rank = config.optim.rows_per_step // world
planner = DataPipeline(replace(config.data, rows_per_micro_batch=config.optim.rows_per_step, pad_rows=True), special)


def my_micro_batches() -> list:
    rows = planner.plan_micro_batch()
    mine = rows[rank * per_rank:(rank + 1) * per_rank]
    return [pack_rows(mine[i:i + plan.rows_per_micro_batch], config.data.seq_len, special)
            for i in range(0, len(mine), plan.rows_per_micro_batch)]


measured, losses = args["steps"] - 1, []
for step in range(args["steps"]):
    if step == 1:
        comms_logger.reset_data()
    loss_sums, counts, _ = optimizer_step(engine, my_micro_batches(), weights, config.optim.loss_normalisation)
    losses.append((loss_sums.sum() / counts.sum()).item())
logged = {name: {"bytes": sum(size * record[0] for size, record in sizes.items()) / measured,
                 "calls": sum(record[0] for record in sizes.values()) / measured}
          for name, sizes in comms_logger.get_raw_data().items()}
if rank == 0:
    print("LOGGED " + json.dumps(logged))
    print("LOSSES " + json.dumps(losses))
dist.barrier()
dist.destroy_process_group()
