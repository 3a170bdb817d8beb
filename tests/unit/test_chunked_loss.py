"""Issue 25 item 4: the heads' loss by bounded chunks of targets (model/head_loss.py) equals the loss over all
targets at once (the forward's loss before it): per-token losses, per-task sums and every gradient, to 1e-6 in
fp32, and the model's forward goes through the chunks (chunk boundaries fall inside the test batch), as many for
every micro-batch of one shape (ZeRO-3's module trace stays the same), without host syncs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import model.head_loss as head_loss_module
import model.janus as janus_module
from model.batch import pack_rows
from model.head_loss import chunk_targets, head_loss
from model.sample import TASKS
from pipeline.loss import step_loss
from tests.support import HostReads, HostSyncs


def assert_equal(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    """Equal to 1e-6 of the tensor's scale (absolute below 1): a gradient summed over hundreds of positions in
    another order differs from the one-pass sum by fp32 round-off (eps 1.2e-7) times a few, not by 1e-6 of each
    element (the tiny model's generation-aligner bias: 1.5e-6 on a tensor whose largest element is 4.1)."""
    assert got.shape == want.shape and got.dtype == want.dtype, name
    if want.numel() == 0:
        return
    err, scale = (got - want).abs().max().item(), max(1.0, want.abs().max().item())
    assert err <= 1e-6 * scale, f"{name}: max |difference| {err:.3g} over a scale of {scale:.3g}"


def unchunked(head, hidden, targets, vocab, max_targets):
    """The forward's loss before the chunks: the head over every target at once."""
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def counting_calls(*modules: nn.Module):
    """Forward calls per module (a checkpointed chunk's recomputation in the backward is one more)."""
    calls = {m: 0 for m in modules}

    def hook(module, *_):
        calls[module] += 1

    return calls, [m.register_forward_hook(hook) for m in modules]


def loss_and_grads(fn, head, hidden, targets, vocab, max_targets):
    hidden = hidden.detach().requires_grad_()
    head.zero_grad()
    loss = fn(head, hidden, targets, vocab, max_targets)
    # Uneven weights: each position's gradient must reach its own row.
    (loss * torch.linspace(0.5, 2.0, loss.numel())).sum().backward()
    grads = [hidden.grad] + [p.grad.clone() for p in head.parameters()]
    head.zero_grad()
    return loss.detach(), grads


def test_the_bound_sizes_chunks_by_fp32_logits():
    assert chunk_targets(102_400) == 655  # 256 MiB / (4 B x 102,400)
    assert chunk_targets(16_384) == 4096
    assert chunk_targets(10**12) == 1  # never zero targets a chunk


LINEAR = lambda d, v: nn.Linear(d, v, bias=False)  # noqa: E731  the LM head's shape
PROJECTED = lambda d, v: nn.Sequential(nn.Linear(d, 8), nn.GELU(), nn.Linear(8, v))  # noqa: E731  the generation head's


@pytest.mark.parametrize(("make_head", "targets", "max_targets", "chunks"), [
    (LINEAR, 700, 700, 2),       # the real bound on a 102,400-wide head: 700 targets are two chunks
    (LINEAR, 100, 8192, 13),     # a 2 x 4096 micro-batch: 13 chunks of 7-8 of its 100 targets
    (PROJECTED, 100, 1400, 3),   # a 1400-position micro-batch: 3 chunks of 33-34
    (LINEAR, 0, 1400, 3),        # no targets: the chunks run empty, and the head's gradient is 0 (not missing)
], ids=["two", "thirteen", "projected", "empty"])
def test_large_vocab_chunks_equal_one_pass(make_head, targets, max_targets, chunks):
    torch.manual_seed(0)
    vocab, width = 102_400, 8
    head = make_head(width, vocab)
    hidden, labels = torch.randn(targets, width), torch.randint(0, vocab, (targets,))
    calls, hooks = counting_calls(head)
    try:
        loss, grads = loss_and_grads(head_loss, head, hidden, labels, vocab, max_targets)
    finally:
        for h in hooks:
            h.remove()
    assert calls[head] == 2 * chunks  # each chunk in the forward and recomputed in the backward
    ref_loss, ref_grads = loss_and_grads(unchunked, head, hidden, labels, vocab, max_targets)
    assert_equal(loss, ref_loss)
    for got, want in zip(grads, ref_grads, strict=True):
        assert_equal(got, want)


@pytest.fixture(scope="module")
def mixed_batch(three_samples, special):
    """Two rows of one shape: understanding + text with a padding tail, generation + text. All three tasks."""
    und, gen, text = three_samples
    return pack_rows([[und, text], [gen, text]], 1300, special)


CHUNKS = 4


@pytest.fixture
def small_chunks(tiny_model, mixed_batch, monkeypatch):
    """A bound that cuts a micro-batch of the test shape into CHUNKS chunks a head (both tiny heads are 1,024 wide):
    the test batch's text and image targets each span several."""
    vocab = tiny_model.config.text_config.vocab_size
    assert vocab == tiny_model.config.vq_config.num_embeddings
    rows = math.ceil(mixed_batch.input_ids.numel() / CHUNKS)
    monkeypatch.setattr(head_loss_module, "LOGITS_CHUNK_BYTES", 4 * vocab * rows)
    assert math.ceil(mixed_batch.input_ids.numel() / chunk_targets(vocab)) == CHUNKS


def forward_backward(model, batch):
    model.zero_grad()
    out = model(batch)
    step_loss(out.loss_sum, batch.target_count.float(), torch.ones(len(TASKS)), "token").backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out, grads


def head_calls(model, batch) -> list[int]:
    heads = (model.lm_head, model.model.generation_head)
    calls, hooks = counting_calls(*heads)
    try:
        forward_backward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return [calls[h] for h in heads]


def test_model_forward_chunked_equals_one_pass(tiny_model, mixed_batch, small_chunks, monkeypatch):
    assert (mixed_batch.target_count > 0).all()
    assert mixed_batch.text_at.numel() > 2 * CHUNKS and mixed_batch.image_at.numel() > 2 * CHUNKS
    # Each head: CHUNKS chunks, each run again in the backward: the model's loss is the chunked one.
    assert head_calls(tiny_model, mixed_batch) == [2 * CHUNKS, 2 * CHUNKS]

    out, grads = forward_backward(tiny_model, mixed_batch)
    monkeypatch.setattr(janus_module, "head_loss", unchunked)
    ref, ref_grads = forward_backward(tiny_model, mixed_batch)
    assert_equal(out.token_loss, ref.token_loss)
    assert_equal(out.loss_sum, ref.loss_sum)
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert_equal(grad, ref_grads[name], name)


def test_a_shape_runs_the_same_chunks_whatever_its_targets(tiny_model, mixed_batch, three_samples, special,
                                                           small_chunks):
    """Text only, in the mixed batch's shape: no image targets, yet the generation head runs as many (empty)
    chunks, so ZeRO-3 sees the same module calls (its trace holds) and the branch rule still gives it a 0 gradient."""
    text = three_samples[2]
    text_only = pack_rows([[text], [text, text]], mixed_batch.input_ids.shape[1], special)
    assert text_only.input_ids.shape == mixed_batch.input_ids.shape and text_only.image_at.numel() == 0
    assert head_calls(tiny_model, text_only) == head_calls(tiny_model, mixed_batch) == [2 * CHUNKS, 2 * CHUNKS]
    _, grads = forward_backward(tiny_model, text_only)
    for name, _ in tiny_model.model.generation_head.named_parameters():
        assert (grads[f"model.generation_head.{name}"] == 0).all()


@pytest.mark.parametrize("text_only", [False, True], ids=["mixed", "text-only"])
def test_chunked_forward_and_backward_make_no_host_syncs(tiny_model, mixed_batch, three_samples, special,
                                                         small_chunks, text_only):
    """Both the chunks with targets and the empty ones (text only: the generation head's)."""
    batch = mixed_batch
    if text_only:
        batch = pack_rows([[three_samples[2]]] * 2, mixed_batch.input_ids.shape[1], special)
    tiny_model.zero_grad()
    with HostSyncs() as mode, HostReads(mode.record):
        out = tiny_model(batch)
        step_loss(out.loss_sum, batch.target_count.float(), torch.ones(len(TASKS)), "token").backward()
    tiny_model.zero_grad()
    assert mode.seen == []
