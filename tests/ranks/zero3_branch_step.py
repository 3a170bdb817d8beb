"""One ZeRO-3 training step on 2 CPU ranks where rank 0 sees only generation rows and rank 1 only
understanding rows. Without the branch rule (every module runs on every rank) this hangs on NCCL and aborts on
gloo with a collective mismatch.

    python tests/ranks/zero3_branch_step.py ARGS_JSON   (under tests.support.run_ranks)
"""

import json
import os
import sys

import deepspeed

from model.config import preset_config
from model.janus import JanusProForTraining
from model.tokenizer import SpecialTokens, load_tokenizer
from pipeline.config import DataConfig
from pipeline.data import DataPipeline

args = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
deepspeed.init_distributed(dist_backend="gloo")
special = SpecialTokens.from_tokenizer(load_tokenizer(args["tokenizer"]))
task_ratio = (0, 0, 1) if rank == 0 else (1, 0, 0)
config = DataConfig(data=[args["corpus"]["generation" if rank == 0 else "understanding"]],
                    ratio=task_ratio, seq_len=1400, rows_per_micro_batch=1, buffer_size=4, num_workers=1)
batch = next(iter(DataPipeline(config, special)))
ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3},
             "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
with deepspeed.zero.Init(config_dict_or_path=ds_config):
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder),
                                run_every_module=args["run_every_module"])
for p in model.model.vqmodel.parameters():
    p.requires_grad_(False)
engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                  model_parameters=[p for p in model.parameters() if p.requires_grad])
out = engine(batch)
engine.backward(out.loss_sum.sum() / out.target_count.sum())
engine.step()
print(f"rank {rank} finished a step, targets {out.target_count.tolist()}")
