"""Issue 18: the model's forward and backward on a packed mixed-task micro-batch make no host syncs.

On a GPU every op that needs a value (or a size) computed on the device blocks the host until the device
catches up, and the next kernels wait for the host. The CPU has no such wait, so this records the ops that
would make one: the aten ops below, seen by a TorchDispatchMode (forward and backward both dispatch there),
and `tolist`, seen by a TorchFunctionMode (it reads the data without dispatching an op)."""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from model.batch import pack_rows, sample_length
from model.chat_format import text_sample
from model.sample import TASKS
from pipeline.loss import step_loss

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


def _has_mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])


class HostSyncs(TorchDispatchMode):
    """The syncing aten ops run while active, by name."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or (func in INDEXING and _has_mask_index(args)):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


class ToList(TorchFunctionMode):
    def __init__(self, seen: list[str]):
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__):
            self.seen.append(func.__name__)
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
    with HostSyncs() as mode, ToList(mode.seen):
        out = model(batch)
        step_loss(out.loss_sum, batch.target_count.float(), weights, "token").backward()
    model.zero_grad()
    return mode.seen


def test_the_recorder_sees_the_syncs_it_looks_for():
    """Each recorded kind, once: a recorder that sees nothing would pass any forward."""
    x = torch.arange(6.0, requires_grad=True)
    with HostSyncs() as mode, ToList(mode.seen):
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
    with ToList(seen):
        assert monitor.maybe_log(5, task_loss, 1e-3, None, [], 1.0, True, {}) is None  # step 5: not a log step
        nonfinite.check(5, applied=False, task_loss=task_loss)
    assert seen == []
    with ToList(seen), pytest.raises(FloatingPointError, match="'generation': 3.0"):
        nonfinite.check(6, applied=False, task_loss=task_loss)
    assert seen == ["tolist"]
