"""Issue 3: an original-layout checkpoint loaded under deepspeed.zero.Init on 2 CPU ranks (gloo) gives the same
gathered weights as the unsharded load, with each rank holding only its shard; a ZeRO-3 save is lossless.

The test starts this file once per rank (`python tests/test_weights_zero.py CHECKPOINT REFERENCE OUT`) with
the environment the deepspeed launcher sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import load_file, save_file

from model.weights import load_model, read_entries, save_checkpoint
from tests.distributed import run_ranks

ASIDE = "aside/"  # prefix of the kept-aside tensors inside the reference file
TIMEOUT_S = 150


def test_zero_init_load_equals_unsharded(original_checkpoint, tmp_path):
    model, aside = load_model(original_checkpoint)  # the unsharded load is the reference
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference.update({ASIDE + k: v for k, v in aside.items()})
    save_file(reference, str(tmp_path / "reference.safetensors"))
    args = [__file__, str(original_checkpoint), str(tmp_path / "reference.safetensors"), str(tmp_path / "out")]
    outputs = run_ranks(args, world_size=2, timeout=TIMEOUT_S)
    for rank, out in enumerate(outputs):
        assert f"rank {rank}: {len(model.state_dict())} gathered equal" in out, out[-4000:]
    assert "rank 0: zero-3 original save lossless" in outputs[0], outputs[0][-4000:]


def worker(checkpoint: str, reference_file: str, out: str) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    zero = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    model, aside = load_model(checkpoint, zero_config=zero)
    reference = load_file(reference_file)

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
    differ += [k for k, v in aside.items() if not torch.equal(v, reference[ASIDE + k])]
    assert not differ and len(aside) == sum(k.startswith(ASIDE) for k in reference), differ
    print(f"rank {rank}: {len(params)} gathered equal; local {local} of {full} elements", flush=True)

    save_checkpoint(model, out, "original", aside, max_shard_bytes=2**20)  # collective; rank 0 writes
    torch.distributed.barrier()
    if rank == 0:
        source, saved = read_entries(checkpoint), read_entries(out)
        assert sorted(source) == sorted(saved), set(source) ^ set(saved)
        differ = [k for k in source if not torch.equal(source[k].read(), saved[k].read())]
        assert not differ, differ
        print("rank 0: zero-3 original save lossless", flush=True)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    worker(*sys.argv[1:4])
