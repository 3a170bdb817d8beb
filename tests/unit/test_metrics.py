"""pipeline/metrics.py against PyTorch's own FLOP counter on a real forward + backward of the tiny model.

Tolerance: FlopCounterMode counts exactly what the analytical formula counts (matmuls, bmm, convolutions)
and, like it, ignores norms, activations, RoPE, softmax, biases and the loss; so the two must agree to
0.1%, not to a few %. Two known differences are taken out explicitly rather than hidden in a tolerance:
the eager attention here computes the dense T x T square of a row (the formula counts causal halves of
real segments), and it runs pad tokens (the formula never counts them), so agreement is checked on rows
without padding, with the dense attention of the row added on the test side.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from model.batch import pack_rows, sample_length
from model.chat_format import Turn, generation_sample, text_sample, understanding_sample
from model.config import preset_config
from model.images import encode_image, understanding_image
from model.janus import JanusProForTraining
from model.stages import ADAPTORS_AND_HEADS, STAGES, set_trainable
from pipeline.metrics import (
    BatchCounts,
    batch_counts,
    mfu,
    packing_efficiency,
    peak_flops,
    real_segment_lengths,
    step_figures,
    tokens_per_second,
    training_flops,
)

REL = 1e-3


@pytest.fixture(scope="module")
def eager_model(special) -> JanusProForTraining:
    """Its own tiny model (the session one stays untouched), eager attention so attention FLOPs are bmm."""
    torch.manual_seed(0)
    config = preset_config("tiny", image_token_id=special.image_placeholder)
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    return JanusProForTraining(config).train()


@pytest.fixture(scope="module")
def samples(tokenizer, photos):
    image = encode_image(understanding_image(photos["coffee.png"]))
    und = understanding_sample(tokenizer, [Turn("user", "<image_placeholder>\nWhat is in the cup?"),
                                           Turn("assistant", "Coffee, with a spoon on the saucer.")], [image])
    gen = generation_sample(tokenizer, "a red rocket on a launch pad", list(range(576)))
    text = text_sample(tokenizer, "The quick brown fox jumps over the lazy dog, twice over.")
    return und, gen, text


def full_rows(samples):
    """One row, no padding: und + gen + text packed to exactly their total length."""
    return [list(samples)], sum(sample_length(s) for s in samples)


def measure(model, batch, backward: bool = True) -> float:
    with FlopCounterMode(display=False) as counter:
        if backward:
            model.zero_grad(set_to_none=True)
            model(batch).loss_sum.sum().backward()
        else:
            with torch.no_grad():
                model(batch)
    return float(counter.get_total_flops())


def dense_llm_attention_forward(config, batch) -> float:
    """What eager attention computes per forward: the full T x T square of every row, per layer."""
    t = config.text_config
    rows, T = batch.input_ids.shape
    return t.num_hidden_layers * rows * 4.0 * t.hidden_size * T * T


def expected_measured(flops, config, batch, backward: bool, checkpointing: bool = False) -> float:
    """The analytic count with its causal-segment attention (2*D*sum L^2 per layer and pass) swapped for the
    dense square eager runs; every batch here feeds the LLM a gradient when `backward`."""
    t = config.text_config
    passes = (3 if backward else 1) + (1 if checkpointing else 0)
    causal = t.num_hidden_layers * 2.0 * t.hidden_size * batch_counts(batch).segment_sq_sum
    return flops.hardware + (dense_llm_attention_forward(config, batch) - causal) * passes


@pytest.mark.parametrize("trainable", [
    STAGES[1].trainable,                                        # LLM frozen, gradient flows through it: 4N
    STAGES[2].trainable,                                        # LLM trains: 6N
    STAGES[3].trainable,                                        # SigLIP trains too
    ("und_adaptor", "gen_adaptor", "gen_head"),                 # Stage I without the gen. embedding
], ids=["stage1", "stage2", "stage3", "stage1-frozen-gen-embedding"])
def test_analytic_flops_equal_flop_counter(eager_model, special, samples, trainable):
    rows, T = full_rows(samples)
    batch = pack_rows(rows, T, special)
    set_trainable(eager_model, trainable)
    measured = measure(eager_model, batch)
    flops = training_flops(batch_counts(batch), eager_model.config, trainable)
    assert measured == pytest.approx(expected_measured(flops, eager_model.config, batch, True), rel=REL)


def test_forward_only_is_2n(eager_model, special, samples):
    rows, T = full_rows(samples)
    batch = pack_rows(rows, T, special)
    measured = measure(eager_model, batch, backward=False)
    flops = training_flops(batch_counts(batch), eager_model.config, ())
    assert measured == pytest.approx(expected_measured(flops, eager_model.config, batch, False), rel=REL)


def test_hfu_adds_one_forward_of_checkpointed_layers_but_their_last_matmul(eager_model, special, samples):
    rows, T = full_rows(samples)
    batch = pack_rows(rows, T, special)
    trainable = STAGES[3].trainable  # both the LLM and SigLIP layers recompute
    set_trainable(eager_model, trainable)
    eager_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        measured = measure(eager_model, batch)
    finally:
        eager_model.activation_checkpointing_disable()
    flops = training_flops(batch_counts(batch), eager_model.config, trainable, checkpointing=True)
    assert set(flops.recompute) == {"llm", "und_encoder"}
    assert flops.hardware > flops.model
    assert measured == pytest.approx(expected_measured(flops, eager_model.config, batch, True, True), rel=REL)
    no_siglip = training_flops(batch_counts(batch), eager_model.config, STAGES[2].trainable, checkpointing=True)
    assert set(no_siglip.recompute) == {"llm"}  # a frozen SigLIP has no backward, so nothing to recompute


def test_pad_tokens_add_nothing(eager_model, special, samples):
    rows, T = full_rows(samples)
    tight, padded = pack_rows(rows, T, special), pack_rows(rows, T + 300, special)
    wider = pack_rows([list(samples), [samples[2]]], T + 300, special)  # a second, mostly empty row
    a, b = batch_counts(tight), batch_counts(padded)
    assert real_segment_lengths(padded) == real_segment_lengths(tight) == [sample_length(s) for s in samples]
    assert a.real_tokens == b.real_tokens == T and b.row_tokens == T + 300
    config, trainable = eager_model.config, STAGES[2].trainable
    assert training_flops(a, config, trainable).model == training_flops(b, config, trainable).model
    # ...while the hardware does run the pads: the counter sees more work, our count does not move.
    set_trainable(eager_model, trainable)
    assert measure(eager_model, padded) > measure(eager_model, tight) * 1.05
    assert packing_efficiency(tight) == 1.0
    assert packing_efficiency(padded) == pytest.approx(T / (T + 300))
    assert packing_efficiency(wider) == pytest.approx((T + sample_length(samples[2])) / (2 * (T + 300)))
    assert batch_counts(wider).samples == 4


def test_frozen_versus_trainable_differs_by_weight_gradients(eager_model, special, samples):
    """Stage I -> II adds exactly the weight gradients of the LLM and LM head: 2N per token / per text target."""
    rows, T = full_rows(samples)
    batch = pack_rows(rows, T, special)
    counts, config = batch_counts(batch), eager_model.config
    t = config.text_config
    one, two = training_flops(counts, config, STAGES[1].trainable), training_flops(counts, config, STAGES[2].trainable)
    layer = 4 * t.hidden_size ** 2 + 3 * t.hidden_size * t.intermediate_size
    expected = (2 * t.num_hidden_layers * layer * counts.real_tokens
                + 2 * t.hidden_size * t.vocab_size * counts.text_targets)
    assert two.model - one.model == pytest.approx(expected, rel=1e-12)
    assert two.parts["llm"] == pytest.approx(one.parts["llm"] * 1.5)  # 6N vs 4N
    assert two.parts["llm_attention"] == one.parts["llm_attention"]  # attention has no weights
    # A text-only batch in Stage I: nothing that trains feeds the LLM, so it is forward-only (2N).
    text_only = pack_rows([[samples[2]]], sample_length(samples[2]), special)
    tc = batch_counts(text_only)
    frozen = training_flops(tc, config, STAGES[1].trainable)
    assert frozen.parts["llm"] == pytest.approx(2 * t.num_hidden_layers * layer * tc.real_tokens)


def test_heads_count_per_target_and_siglip_per_image(eager_model, special, samples):
    config = eager_model.config
    base = BatchCounts(rows=1, row_tokens=1000, real_tokens=1000, samples=1, segment_sq_sum=1000 ** 2)
    f0 = training_flops(base, config, STAGES[2].trainable)
    f1 = training_flops(base + BatchCounts(text_targets=10), config, STAGES[2].trainable)
    assert f1.model - f0.model == pytest.approx(6 * 10 * config.text_config.hidden_size * config.text_config.vocab_size)
    assert f0.parts["und_encoder"] == 0 and f0.parts["gen_head"] == 0
    img = training_flops(base + BatchCounts(und_images=2), config, STAGES[2].trainable)
    assert img.parts["und_encoder"] == pytest.approx(2 * training_flops(
        base + BatchCounts(und_images=1), config, STAGES[2].trainable).parts["und_encoder"])


def test_counts_sum_and_round_trip_a_tensor(special, samples):
    rows, T = full_rows(samples)
    c = batch_counts(pack_rows(rows, T, special))
    assert c.und_images == 1 and c.gen_image_tokens == 576 and c.image_targets == 576 and c.samples == 3
    assert c.segment_sq_sum == sum(sample_length(s) ** 2 for s in samples)
    both = c + c
    assert both.real_tokens == 2 * c.real_tokens
    assert BatchCounts.from_tensor(both.to_tensor()) == both


def test_peak_table_mfu_and_step_figures(tiny_model):
    assert peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("Intel Xeon") is None
    if not torch.cuda.is_available():
        assert peak_flops() is None
    assert mfu(312e12, 1.0, 2, 312e12) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, 1, None) is None
    assert tokens_per_second(4096, 2.0) == 2048
    counts = BatchCounts(rows=2, row_tokens=8192, real_tokens=8000, samples=10, segment_sq_sum=10 * 800 ** 2,
                         text_targets=3000, image_targets=2000, und_images=2, gen_image_tokens=2304)
    config = tiny_model.config
    fig = step_figures(counts, 2.0, 4, config, ADAPTORS_AND_HEADS + ("llm", "lm_head"), True, 989e12)
    flops = training_flops(counts, config, ADAPTORS_AND_HEADS + ("llm", "lm_head"), True)
    assert fig.tokens_per_s == 4000 and fig.tokens_per_s_per_gpu == 1000 and fig.samples_per_s == 5
    assert fig.packing_efficiency == pytest.approx(8000 / 8192)
    assert fig.mfu == pytest.approx(flops.model / (2.0 * 4 * 989e12))
    assert fig.hfu > fig.mfu
    assert fig.as_dict()["model_tflops_per_gpu"] == pytest.approx(flops.model / 8 / 1e12)
