"""Issue 18: no host syncs on the hot path: the model's forward and backward on a packed mixed-task micro-batch,
and the training step around them (pipeline/train.py's loop on 2 DeepSpeed ranks) outside log steps.

On a GPU every op that needs a value (or a size) computed on the device blocks the host until the device
catches up, and the next kernels wait for the host. The CPU has no such wait, so this records the ops that
would make one: the aten ops below, seen by a TorchDispatchMode (forward and backward both dispatch there),
and `tolist`/`item`/`cpu`, seen by a TorchFunctionMode (they read the data without dispatching an op).

In-process tests here; the ones that start processes or take long are in tests/integration/test_host_syncs.py.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.batch import pack_rows, sample_length
from model.chat_format import text_sample
from model.sample import TASKS
from pipeline.loss import step_loss
from tests.support import HostReads, HostSyncs


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
