"""A ZeRO-3 sample grid on 2 CPU ranks: the parameter all-gathers it makes, counted, and its ids, generated
today's way (every module call gathers its weights) and with one gather per grid (pipeline.evaluation).

    python tests/ranks/zero3_sample_grid.py ARGS_JSON   (under tests.support.run_ranks)

ARGS_JSON: {"tokenizer": DIR, "prompts": [STR, ...]}. Three ways, each printed as one JSON line {"way",
"gathers", "params", "ids"}: `today`, `once`, and `fallback` (one gather per grid with GATHER_MEMORY_SHARE 0,
as if the generation modules fitted no rank's memory: it must gather per call again).
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
from model.generate import decode_images, generate_image_ids  # noqa: E402
from model.janus import JanusProForTraining  # noqa: E402
from model.tokenizer import SpecialTokens, load_tokenizer  # noqa: E402
from pipeline import evaluation  # noqa: E402

args = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
deepspeed.init_distributed(dist_backend="gloo")
tokenizer = load_tokenizer(args["tokenizer"])
special = SpecialTokens.from_tokenizer(tokenizer)
# Persistence threshold 0: every parameter is partitioned, as a 7B model's large ones are (the default keeps
# parameters under 1e5 elements, all of the tiny model's, whole on every rank).
ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
             "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                   "stage3_model_persistence_threshold": 0},
             "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds_config):
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
for p in model.model.vqmodel.parameters():
    p.requires_grad_(False)
engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                  model_parameters=[p for p in model.parameters() if p.requires_grad])
prompts, seed = args["prompts"], 7
params = sum(1 for m in evaluation.generation_modules(engine.module) for _ in m.parameters())


@torch.no_grad()
def todays_grid():
    """The grid as pipeline/evaluation.py made it before one gather per grid."""
    ids = generate_image_ids(engine.module, tokenizer, prompts, cfg=5.0, seed=seed, backend="loop")
    with deepspeed.zero.GatheredParameters(list(engine.module.model.vqmodel.parameters())):
        decode_images(engine.module, ids)
    return ids


def counted(way, make_ids):
    engine.eval()
    before = sum(GATHERS.values())
    ids = make_ids()
    engine.train()
    # Every parameter is partitioned again afterwards: the grid leaves no whole copy behind.
    whole = [n for n, p in engine.module.named_parameters() if p.ds_status.name != "NOT_AVAILABLE"]
    assert not whole, whole[:5]
    print(json.dumps({"way": way, "gathers": sum(GATHERS.values()) - before, "params": params,
                      "ids": ids.tolist()}), flush=True)


counted("today", todays_grid)
counted("once", lambda: evaluation.sample_images(engine.module, tokenizer, prompts, cfg=5.0, seed=seed)[0])
evaluation.GATHER_MEMORY_SHARE = 0.0
counted("fallback", lambda: evaluation.sample_images(engine.module, tokenizer, prompts, cfg=5.0, seed=seed)[0])
print(f"rank {rank} done", flush=True)
