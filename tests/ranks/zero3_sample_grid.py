"""A ZeRO-3 sample grid on 2 CPU ranks (pipeline.evaluation): the parameter all-gathers it makes, counted, and its
ids, with one gather per grid and in its fallback, where every module call gathers its own weights.

    python tests/ranks/zero3_sample_grid.py ARGS_JSON   (under tests.support.run_ranks)

ARGS_JSON: {"tokenizer": DIR, "prompts": [STR, ...]}. Two ways, each printed as one JSON line {"way",
"gathers", "params", "ids"}: `once`, and `fallback` (GATHER_MEMORY_SHARE 0, as if the generation modules fitted
no rank's memory: each module call gathers its weights, as ZeRO-3 does by itself, once per token).
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

args = json.loads(sys.argv[1])
rank = int(os.environ["RANK"])
deepspeed.init_distributed(dist_backend="gloo")
tokenizer = load_tokenizer(args["tokenizer"])
special = SpecialTokens.from_tokenizer(tokenizer)
ds_config = PARTITIONED_ZERO3
torch.manual_seed(0)
with deepspeed.zero.Init(config_dict_or_path=ds_config):
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
for p in model.model.vqmodel.parameters():
    p.requires_grad_(False)
engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                  model_parameters=[p for p in model.parameters() if p.requires_grad])
prompts, seed = args["prompts"], 7
params = sum(1 for m in evaluation.generation_modules(engine.module) for _ in m.parameters())


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


counted("once", lambda: evaluation.sample_images(engine.module, tokenizer, prompts, cfg=5.0, seed=seed)[0])
evaluation.GATHER_MEMORY_SHARE = 0.0
counted("fallback", lambda: evaluation.sample_images(engine.module, tokenizer, prompts, cfg=5.0, seed=seed)[0])
print(f"rank {rank} done", flush=True)
