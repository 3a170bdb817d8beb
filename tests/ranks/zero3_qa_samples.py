"""Held-out Q&A samples under ZeRO-3 on 2 CPU ranks: every rank answers through pipeline.evaluation.Sampler, once
with the understanding modules gathered once and once gathering per module call (GATHER_MEMORY_SHARE 0, as if
they fitted no rank's memory); the parameter all-gathers each way makes are counted.

    python tests/ranks/zero3_qa_samples.py ARGS_JSON   (under tests.support.run_ranks)

ARGS_JSON: {"tokenizer": DIR, "val_data": [MANIFEST_DIR, ...], "output": RUN_DIR, "tokens": N, "wandb": bool}.
Each way is printed as one JSON line {"way", "gathers", "params", "replies"}; rank 0 writes RUN_DIR's TensorBoard
events, and with "wandb" starts an offline W&B run in RUN_DIR first, as the Monitor does, draws a sample grid at
step 1 too, and prints the run's files folder as {"wandb_files": DIR}.
"""

# isort: off
# Before deepspeed: the all-gathers are counted where they reach torch.distributed.
from tests.ranks.gathers import GATHERS, PARTITIONED_ZERO3

import deepspeed
# isort: on
import json
import os
import sys

import torch
import torch.distributed

from model.config import preset_config
from model.janus import JanusProForTraining
from model.tokenizer import SpecialTokens, load_tokenizer
from pipeline import evaluation
from pipeline.config import LoggingConfig

args = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
deepspeed.init_distributed(dist_backend="gloo")
tokenizer = load_tokenizer(args["tokenizer"])
special = SpecialTokens.from_tokenizer(tokenizer)
ds_config = PARTITIONED_ZERO3
torch.manual_seed(0)  # the same weights on every rank before ZeRO-3 partitions them
model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
with torch.no_grad():
    model.lm_head.weight.normal_(0, 1)  # a fresh tiny model repeats one token: answers would all be alike
engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=list(model.parameters()))
logging = LoggingConfig(sample_every=0, sample_prompts=["a red cube"], qa_every=1, qa_max_new_tokens=args["tokens"],
                        wandb_project="qa" if args.get("wandb") else None)
run = None
if args.get("wandb") and rank == 0:
    import wandb

    run = wandb.init(project="qa", dir=args["output"], mode="offline")
sampler = evaluation.Sampler(logging, args["output"], tokenizer, val_data=args["val_data"])
params = sum(1 for m in evaluation.understanding_modules(engine.module) for _ in m.parameters())


def counted(way, step):
    before = sum(GATHERS.values())
    replies = sampler.answers(engine, step)
    whole = [n for n, p in engine.module.named_parameters() if p.ds_status.name != "NOT_AVAILABLE"]
    assert not whole, whole[:5]  # nothing left gathered afterwards
    print(json.dumps({"way": way, "gathers": sum(GATHERS.values()) - before, "params": params,
                      "replies": replies}), flush=True)


counted("once", 1)
if args.get("wandb"):
    sampler.grid(engine, 1)
evaluation.GATHER_MEMORY_SHARE = 0.0
counted("fallback", 2)
sampler.close()
if run is not None:
    run.finish()
    print(json.dumps({"wandb_files": run.dir}), flush=True)
torch.distributed.barrier()
print(f"rank {rank} done", flush=True)
