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
