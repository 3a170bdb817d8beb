"""One rank of tests/integration/test_host_syncs.py's training-step test: train() under the host-sync recorders.

    python tests/ranks/record_host_syncs.py ARGS_JSON   (under tests.support.run_ranks)

ARGS_JSON: {"flags": [stage 2 flags]}. Prints every sync as a `SYNC {json}` line.
"""

import json
import sys
import warnings

import torch

from tests.support import HostReads, HostSyncs


def record_training_steps(args: dict) -> None:
    """One rank: train() under the recorders, every sync printed as a `SYNC {json}` line. On a GPU also the
    driver's own record (torch.cuda.set_sync_debug_mode): every blocking copy and stream sync, by whose code."""
    import deepspeed
    import torch.distributed as dist

    from model.tokenizer import SpecialTokens, load_tokenizer
    from pipeline.config import resolve
    from pipeline.data import DataPipeline
    from pipeline.ds_config import batch_plan
    from pipeline.engine import build_engine, run_deepspeed_config
    from pipeline.evaluation import Sampler, Validator
    from pipeline.monitor import StopFlag
    from pipeline.train import train

    class Drawn(DataPipeline):
        """Counts the micro-batches the loop has drawn: the step a sync belongs to."""

        drawn = 0

        def __iter__(self):
            for batch in super().__iter__():
                self.drawn += 1
                yield batch

    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    config, invocation = resolve(2, args["flags"])
    tokenizer = load_tokenizer(config.model.tokenizer)
    special = SpecialTokens.from_tokenizer(tokenizer)
    plan = batch_plan(config.optim.rows_per_step, world, config.data.rows_per_micro_batch)
    janus = invocation.model_config
    engine = build_engine(config, run_deepspeed_config(config, plan, janus), janus, special.image_placeholder)
    data = Drawn(config.data, special, rank, world)
    with HostSyncs(lambda: -(-data.drawn // plan.accumulation_steps)) as mode, HostReads(mode.record):
        if cuda:
            def showwarning(message, *_) -> None:
                if "synchroniz" in str(message):  # "called a synchronizing CUDA operation"
                    mode.record(f"cuda: {message}")

            torch.cuda.set_sync_debug_mode("warn")
            warnings.simplefilter("always")
            warnings.showwarning = showwarning
        train(config, plan=plan, engine=engine, data=data, start_step=0, resumed_from=None, device=device,
              stop=StopFlag(), validator=Validator(config.data, config.logging, special, device),
              sampler=Sampler(config.logging, config.checkpoint.output, tokenizer))
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    for site in mode.sites:
        print("SYNC " + json.dumps(site), flush=True)
    dist.barrier()  # leave together: gloo's teardown can abort while a peer still talks
    dist.destroy_process_group()


if __name__ == "__main__":
    record_training_steps(json.loads(sys.argv[1]))
