"""What the ZeRO-3 generation rank scripts share: every parameter all-gather counted where it reaches
torch.distributed, and a ZeRO-3 config that partitions every parameter.

Import it before deepspeed: DeepSpeed's communication backend keeps its own reference to each function at
init_distributed, so only functions replaced before then are counted.
"""

import collections
import functools

import torch.distributed

GATHERS = collections.Counter()


def _counted(fn, name):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        GATHERS[name] += 1
        return fn(*args, **kwargs)
    return wrapper


for _name in ("all_gather_into_tensor", "all_gather", "_all_gather_base"):
    setattr(torch.distributed, _name, _counted(getattr(torch.distributed, _name), _name))

# Persistence threshold 0: every parameter is partitioned, as a 7B model's large ones are (the default keeps
# parameters under 1e5 elements, all of the tiny model's, whole on every rank).
PARTITIONED_ZERO3 = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                     "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                           "stage3_model_persistence_threshold": 0},
                     "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
