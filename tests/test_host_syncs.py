"""Issue 18: no host syncs on the hot path: the model's forward and backward on a packed mixed-task micro-batch,
and the training step around them (pipeline/train.py's loop on 2 DeepSpeed ranks) outside log steps.

On a GPU every op that needs a value (or a size) computed on the device blocks the host until the device
catches up, and the next kernels wait for the host. The CPU has no such wait, so this records the ops that
would make one: the aten ops below, seen by a TorchDispatchMode (forward and backward both dispatch there),
and `tolist`/`item`/`cpu`, seen by a TorchFunctionMode (they read the data without dispatching an op).

    python tests/test_host_syncs.py ARGS_JSON   (one rank of the training-step test, under tests.support)
"""

from __future__ import annotations

import dataclasses
import json
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from model.batch import pack_rows, sample_length
from model.chat_format import text_sample
from model.sample import TASKS
from pipeline.loss import step_loss
from tests.support import REPO

aten = torch.ops.aten
# Ops whose result (or its size) the host must read: item/bool/int/float, data-dependent output sizes,
# bincount, whose GPU kernel sizes its output from the input's max even when given minlength, and
# masked_scatter's backward, a masked_select inside one op.
SYNCING = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default, aten.argwhere.default,
           aten.masked_select.default, aten.bincount.default, aten.unique_consecutive.default,
           aten._unique2.default, aten.unique_dim.default, aten.repeat_interleave.Tensor,
           aten.masked_scatter_backward.default}
# Indexing ops that sync only when an index is a boolean mask (it becomes indices by a nonzero).
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
# Reads of a tensor's data that dispatch no op of their own (`cpu` of a CPU tensor returns it; on a GPU it copies).
READS = (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.cpu)


def _has_mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])


def whose(stack: traceback.StackSummary) -> tuple[str, str]:
    """("deepspeed" or "ours", file:line function): the innermost frame of DeepSpeed's or of ours (model/,
    pipeline/) that asked for the sync. A sync in the autograd graph's backward shows DeepSpeed's
    `engine.backward`, which runs it: the model's own backward is checked without DeepSpeed below."""
    for frame in reversed(stack):
        path = Path(frame.filename)
        if "deepspeed" in path.parts:
            inside = "/".join(path.parts[path.parts.index("deepspeed") + 1:])
            return "deepspeed", f"{inside}:{frame.lineno} {frame.name}"
        if path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in ("model", "pipeline"):
            return "ours", f"{path.relative_to(REPO)}:{frame.lineno} {frame.name}"
    return "ours", "?"


class HostSyncs(TorchDispatchMode):
    """The syncing aten ops run while active, by name; with a `clock` (the step now), also by step and whose."""

    def __init__(self, clock: Callable[[], int] | None = None):
        super().__init__()
        self.seen: list[str] = []
        self.clock, self.sites = clock, []

    def record(self, name: str) -> None:
        self.seen.append(name)
        if self.clock is not None:
            who, site = whose(traceback.extract_stack())
            self.sites.append({"step": self.clock(), "who": who, "op": name, "site": site})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or (func in INDEXING and _has_mask_index(args)):
            self.record(str(func))
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    def __init__(self, record: Callable[[str], None]):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.record(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def mixed_batch(three_samples, special):
    """Two rows: understanding + text with a padding tail, generation + text."""
    und, gen, text = three_samples
    seq_len = max(sample_length(und), sample_length(gen)) + sample_length(text) + 5
    return pack_rows([[und, text], [gen, text]], seq_len, special)


def forward_backward_syncs(model, batch) -> list[str]:
    weights = torch.ones(len(TASKS))
    model.zero_grad()
    with HostSyncs() as mode, HostReads(mode.record):
        out = model(batch)
        step_loss(out.loss_sum, batch.target_count.float(), weights, "token").backward()
    model.zero_grad()
    return mode.seen


def test_the_recorder_sees_the_syncs_it_looks_for():
    """Each recorded kind, once: a recorder that sees nothing would pass any forward."""
    x = torch.arange(6.0, requires_grad=True)
    with HostSyncs() as mode, HostReads(mode.record):
        mask = x > 2
        bool(mask.any())
        x[mask].sum().backward()
        torch.bincount(torch.tensor([0, 2]), minlength=3)
        x.detach().tolist()
    assert "__bool__" in mode.seen and "aten._local_scalar_dense.default" in mode.seen
    assert "aten.index.Tensor" in mode.seen
    assert "aten.bincount.default" in mode.seen and "tolist" in mode.seen
    assert any("index_put" in s for s in mode.seen)  # the backward of the mask indexing


def test_packed_forward_and_backward_make_no_host_syncs(tiny_model, mixed_batch):
    assert (mixed_batch.target_count > 0).all()  # all three tasks
    assert forward_backward_syncs(tiny_model, mixed_batch) == []


def test_a_batch_moves_whole_and_pins_only_where_cuda_is(mixed_batch):
    """On a GPU: pinned, then copied without the host waiting (sync debug mode "error" raises on a blocking copy).
    Without CUDA pinning is the batch itself, and `to` keeps every field (floats in the dtype asked)."""
    cuda = torch.cuda.is_available()
    pinned = mixed_batch.pin_memory()
    values = {f.name: getattr(mixed_batch, f.name) for f in dataclasses.fields(mixed_batch)}
    if cuda:
        assert all(getattr(pinned, n).is_pinned() for n, v in values.items()
                   if isinstance(v, torch.Tensor) and v.numel())  # an empty tensor has no memory to pin
        torch.cuda.set_sync_debug_mode("error")
    else:
        assert pinned is mixed_batch
    try:
        moved = pinned.to("cuda" if cuda else "cpu", dtype=torch.bfloat16)
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    for name, value in values.items():
        got = getattr(moved, name)
        if not isinstance(value, torch.Tensor):
            assert got == value
            continue
        assert got.dtype == (torch.bfloat16 if value.is_floating_point() else value.dtype)
        assert torch.equal(got.cpu(), value.to(got.dtype)), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinning needs CUDA")
def test_the_data_path_hands_out_pinned_batches(shard_corpus, special, tmp_path):
    """Pinned in the data path's worker thread, so the training thread pays neither the pinning nor a blocking copy."""
    from pipeline.config import resolve
    from pipeline.data import DataPipeline

    config, _ = resolve(2, ["--model", "tiny", "--output", str(tmp_path), "--seq-len", "1400",
                            "--data", *[str(shard_corpus[t]) for t in ("understanding", "text", "generation")]])
    assert next(iter(DataPipeline(config.data, special))).input_ids.is_pinned()


def test_single_task_forward_makes_no_host_syncs(tiny_model, tokenizer, special):
    """A text-only micro-batch runs every other module on dummy inputs (the ZeRO-3 branch rule), sync-free too."""
    text = text_sample(tokenizer, "A short line of text.")
    assert forward_backward_syncs(tiny_model, pack_rows([[text]], sample_length(text) + 3, special)) == []


def test_step_losses_are_read_only_on_log_steps(tmp_path):
    """The train loop leaves each step's task losses on the device: the monitor reads them on log steps only
    (a non-log step returns before) and the non-finite counter only when it stops the run."""
    from pipeline.config import resolve
    from pipeline.monitor import Monitor, NonfiniteSteps

    config, _ = resolve(1, ["--model", "tiny", "--output", str(tmp_path), "--log-every", "10"])
    monitor, nonfinite = Monitor(config, rank=1, start_step=0), NonfiniteSteps(limit=2)
    task_loss = torch.tensor([1.0, 2.0, 3.0])
    seen: list[str] = []
    with HostReads(seen.append):
        assert monitor.maybe_log(5, task_loss, 1e-3, None, [], 1.0, True, {}) is None  # step 5: not a log step
        nonfinite.check(5, applied=False, task_loss=task_loss)
    assert seen == []
    with HostReads(seen.append), pytest.raises(FloatingPointError, match="'generation': 3.0"):
        nonfinite.check(6, applied=False, task_loss=task_loss)
    assert seen == ["tolist"]


QUIET_STEPS = (2, 3, 4)  # of 5, logging every 100: step 1 (the first) and 5 (the last) log, 5 checkpoints


@pytest.mark.integration
def test_training_steps_make_no_host_syncs_of_ours_outside_log_steps(shard_corpus, tokenizer_dir, init_checkpoint,
                                                                      tmp_path):
    """train() itself, 2 ranks x 2 micro-batches per step: on the steps that neither log nor checkpoint, every
    host sync is DeepSpeed's own: its ZeRO-3 step reads whether the gradient norm is finite (and torch's AdamW
    reads its step count, a host tensor). Without the stop flag's one-step-late read, every step had one of ours."""
    from tests.support import run_ranks

    flags = ["--model", "tiny", "--tokenizer", str(tokenizer_dir), "--init", str(init_checkpoint),
             "--data", *[str(shard_corpus[t]) for t in ("understanding", "text", "generation")],
             "--seq-len", "1400", "--rows-per-step", "4", "--rows-per-micro-batch", "1", "--train-steps", "5",
             "--log-every", "100", "--save-every", "1000", "--num-workers", "1", "--output", str(tmp_path / "run")]
    (tmp_path / "run").mkdir()
    gpus = torch.cuda.device_count()
    outputs = run_ranks([__file__, json.dumps({"flags": flags})], world_size=min(gpus, 2) or 2, timeout=600,
                        env={"DS_ACCELERATOR": "cuda"} if gpus else None)
    syncs = [{**json.loads(line[len("SYNC "):]), "rank": rank} for rank, out in enumerate(outputs)
             for line in out.splitlines() if line.startswith("SYNC ")]
    quiet = [s for s in syncs if s["step"] in QUIET_STEPS]
    print("host syncs on the quiet steps:", *sorted({f"{s['op']} at {s['site']}" for s in quiet}), sep="\n  ")
    ours = [f"rank {s['rank']} step {s['step']}: {s['op']} at {s['site']}" for s in quiet if s["who"] == "ours"]
    assert not ours, "\n".join(ours)
    # The recorder was there all along: it saw DeepSpeed's step on every quiet step and ours on the first (a log step).
    assert {(s["rank"], s["step"]) for s in quiet} == {(r, n) for r in range(len(outputs)) for n in QUIET_STEPS}
    assert any(s["who"] == "ours" and s["step"] == 1 for s in syncs)


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
    config, _ = resolve(2, args["flags"])
    tokenizer = load_tokenizer(config.model.tokenizer)
    special = SpecialTokens.from_tokenizer(tokenizer)
    plan = batch_plan(config.optim.rows_per_step, world, config.data.rows_per_micro_batch)
    engine = build_engine(config, run_deepspeed_config(config, plan), special.image_placeholder)
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
              stop=StopFlag(), validator=Validator(config, special, device), sampler=Sampler(config, tokenizer))
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    for site in mode.sites:
        print("SYNC " + json.dumps(site), flush=True)
    dist.barrier()  # leave together: gloo's teardown can abort while a peer still talks
    dist.destroy_process_group()


if __name__ == "__main__":
    record_training_steps(json.loads(sys.argv[1]))
