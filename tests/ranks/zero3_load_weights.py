"""An original-layout checkpoint loaded under deepspeed.zero.Init gives the same gathered weights as the
unsharded load (the reference file), each rank holding only its shard; a ZeRO-3 save is lossless.

    python tests/ranks/zero3_load_weights.py ARGS_JSON   (under tests.support.run_ranks)

ARGS_JSON: {"checkpoint": DIR, "reference": FILE, "out": DIR, "aside_prefix": STR}.
"""

import json
import sys

import deepspeed
import torch
from safetensors.torch import load_file

from model.weights import load_model, read_entries, save_checkpoint

args = json.loads(sys.argv[1])
aside_prefix = args["aside_prefix"]  # prefix of the kept-aside tensors inside the reference file
deepspeed.init_distributed(dist_backend="gloo")
rank = torch.distributed.get_rank()
zero = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
model, aside = load_model(args["checkpoint"], zero_config=zero)
reference = load_file(args["reference"])

params = dict(model.named_parameters())
assert all(hasattr(p, "ds_id") for p in params.values()), "model was not built under zero.Init"
# Each rank holds only its shard: about half of every parameter.
local, full = sum(p.ds_tensor.numel() for p in params.values()), sum(p.ds_numel for p in params.values())
assert local <= full // 2 + 2 * len(params), (local, full)

differ = []
for name, p in params.items():
    with deepspeed.zero.GatheredParameters([p]):
        if p.data.shape != reference[name].shape or not torch.equal(p.data, reference[name]):
            differ.append(name)
differ += [k for k, v in aside.items() if not torch.equal(v, reference[aside_prefix + k])]
assert not differ and len(aside) == sum(k.startswith(aside_prefix) for k in reference), differ
print(f"rank {rank}: {len(params)} gathered equal; local {local} of {full} elements", flush=True)

save_checkpoint(model, args["out"], "original", aside, max_shard_bytes=2**20)  # collective; rank 0 writes
torch.distributed.barrier()
if rank == 0:
    source, saved = read_entries(args["checkpoint"]), read_entries(args["out"])
    assert sorted(source) == sorted(saved), set(source) ^ set(saved)
    differ = [k for k in source if not torch.equal(source[k].read(), saved[k].read())]
    assert not differ, differ
    print("rank 0: zero-3 original save lossless", flush=True)
torch.distributed.destroy_process_group()
