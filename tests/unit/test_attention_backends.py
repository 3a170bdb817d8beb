import pytest
import torch

from pipeline.attention import BACKENDS, _causal_kwargs, use_attention
from pipeline.config import DataConfig
from pipeline.data import DataPipeline


def test_causal_argument_is_picked_by_signature():
    def new_style(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        pass

    def old_style(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, scale=None):
        pass

    assert _causal_kwargs(new_style) == {"window_size": (-1, 0)}
    assert _causal_kwargs(old_style) == {"is_causal": True}
    with pytest.raises(RuntimeError):
        _causal_kwargs(lambda q, k, v: None)


def test_unknown_backend_is_refused(tiny_model):
    with pytest.raises(ValueError, match="sdpa"):
        use_attention(tiny_model, "eager-ish")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "sdpa"])
def test_backend_matches_fp32_sdpa_reference_in_bf16(backend, shard_corpus, special):
    if backend == "flash_attention_2":
        pytest.importorskip("flash_attn")
    from model.config import preset_config
    from model.janus import JanusProForTraining

    torch.manual_seed(0)
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder)).cuda().eval()
    config = DataConfig(data=[str(shard_corpus[t]) for t in ("understanding", "text", "generation")],
                        ratio=[2, 3, 5], seq_len=4096, rows_per_micro_batch=2)
    batch = next(iter(DataPipeline(config, special))).to("cuda")
    with torch.no_grad():
        reference = model(batch).token_loss
        use_attention(model, backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(batch).token_loss
        use_attention(model, "sdpa")
    has = reference != 0
    assert (got[has] - reference[has]).abs().mean() < 0.02
    assert (got[has] - reference[has]).abs().max() < 0.25


@pytest.mark.parametrize("pad_rows", [False, True])
def test_sdpa_runs_each_packed_sample_alone_and_equals_the_masked_square(pad_rows, shard_corpus, special):
    """The `sdpa` backend's per-sample SDPA (no mask, each sample's own square) gives the losses and gradients of
    transformers' sdpa under the block-diagonal mask of the whole micro-batch, flat or in padded rows."""
    from model.config import preset_config
    from model.janus import JanusProForTraining

    config = DataConfig(data=[str(shard_corpus[t]) for t in ("understanding", "text", "generation")],
                        ratio=[2, 3, 5], seq_len=1400, rows_per_micro_batch=3, pad_rows=pad_rows)
    batch = next(iter(DataPipeline(config, special)))
    assert len(batch.segment_lengths) > 3 and sum(batch.segment_lengths) == batch.input_ids.numel()

    def losses_and_grads(backend: str | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
        if backend:
            use_attention(model, backend)
        out = model(batch)
        out.loss_sum.sum().backward()
        return out.token_loss.detach(), [p.grad for p in model.parameters() if p.grad is not None]

    masked, per_sample = losses_and_grads(None), losses_and_grads("sdpa")
    assert torch.allclose(masked[0], per_sample[0], atol=1e-5)
    for a, b in zip(masked[1], per_sample[1], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * a.abs().max().item() + 1e-9)


def test_generation_runs_on_transformers_sdpa_whatever_the_backend(special):
    """A sample grid's left-padded prompts need transformers' masks: under the packed backends the language model
    would refuse them (no segments), so generation switches to transformers' sdpa and back."""
    from model.config import preset_config
    from model.janus import JanusProForTraining
    from pipeline.attention import transformers_attention

    torch.manual_seed(0)
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder)).eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded prompt, as a batch of generation prompts has
    with torch.no_grad():
        reference = model.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state
        for backend in ("sdpa", "varlen"):
            use_attention(model, backend)
            with pytest.raises(ValueError, match="needs"):
                model.model.language_model(input_ids=ids, attention_mask=mask)
            with transformers_attention(model):
                got = model.model.language_model(input_ids=ids, attention_mask=mask).last_hidden_state
            assert model.model.language_model.config._attn_implementation != "sdpa"  # switched back
            assert torch.allclose(reference[mask.bool()], got[mask.bool()], atol=1e-6)
