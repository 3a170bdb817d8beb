"""Held-out Q&A samples under ZeRO-3 on 2 CPU ranks: every rank answers through pipeline.evaluation.Sampler, once
with the understanding modules gathered once and once gathering per module call (GATHER_MEMORY_SHARE 0, as if
they fitted no rank's memory); the parameter all-gathers each way makes are counted.

    python tests/ranks/zero3_qa_samples.py ARGS_JSON   (under tests.support.run_ranks)

ARGS_JSON: {"tokenizer": DIR, "val_data": [MANIFEST_DIR, ...], "output": RUN_DIR, "tokens": N, "wandb": bool}.
Each way is printed as one JSON line {"way", "gathers", "params", "replies"}; rank 0 writes RUN_DIR's TensorBoard
events, and with "wandb" starts an offline W&B run in RUN_DIR first, as the Monitor does, draws a sample grid at
step 1 too, and prints the run's files folder as {"wandb_files": DIR}.
"""

import collections
import functools
import json
import os
import sys

import torch
import torch.distributed

# Count every all-gather that reaches torch.distributed, before DeepSpeed's communication backend keeps its own
# reference to the function at init_distributed.
GATHERS = collections.Counter()
for _name in ("all_gather_into_tensor", "all_gather", "_all_gather_base"):
    def _counted(fn, name):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            GATHERS[name] += 1
            return fn(*args, **kwargs)
        return wrapper
    setattr(torch.distributed, _name, _counted(getattr(torch.distributed, _name), _name))

import deepspeed  # noqa: E402

from model.config import preset_config  # noqa: E402
from model.janus import JanusProForTraining  # noqa: E402
from model.tokenizer import SpecialTokens, load_tokenizer  # noqa: E402
from pipeline import evaluation  # noqa: E402
from pipeline.config import LoggingConfig  # noqa: E402

args = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
deepspeed.init_distributed(dist_backend="gloo")
tokenizer = load_tokenizer(args["tokenizer"])
special = SpecialTokens.from_tokenizer(tokenizer)
# Persistence threshold 0: every parameter is partitioned, as a 7B model's large ones are.
ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                   "stage3_model_persistence_threshold": 0},
             "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
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
