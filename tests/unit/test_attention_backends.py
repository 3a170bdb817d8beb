import pytest
import torch
import torch.nn.functional as F

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


# ---- a contract double for torch's varlen flash kernel: the GPU path proven on the CPU ----

HALF = (torch.float16, torch.bfloat16)


def contract_varlen_attn(calls: list[dict]):
    """A stand-in for `torch.nn.attention.varlen.varlen_attn` that asserts the input contract of the CUDA flash
    kernel behind it (torch/nn/attention/varlen.py and aten's flash `mha_varlen_fwd`), then answers with SDPA once
    per segment, causal, in float32, cast back to the inputs' dtype. It takes the installed torch's signature, so
    `_causal_kwargs` picks the same causal argument as for the real function."""
    import inspect

    from torch.nn.attention import varlen

    real = inspect.signature(varlen.varlen_attn)

    def double(*args, **kwargs):
        bound = real.bind(*args, **kwargs)  # an argument the real function does not take fails here
        bound.apply_defaults()
        a = bound.arguments
        q, k, v, cu_q, cu_k = a["query"], a["key"], a["value"], a["cu_seq_q"], a["cu_seq_k"]
        calls.append({"dtype": q.dtype})
        # dtypes: one of fp16/bf16, the same for q, k and v ("FlashAttention only supports fp16 and bf16")
        assert q.dtype in HALF, f"query is {q.dtype}; the flash kernel takes only fp16 or bf16"
        assert k.dtype == q.dtype and v.dtype == q.dtype, f"q/k/v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}"
        # shapes [total, heads, head_dim]; the same heads unless enable_gqa
        assert q.dim() == k.dim() == v.dim() == 3, "q/k/v must be [total, heads, head_dim]"
        assert k.shape == v.shape and k.shape[0] == q.shape[0] and k.shape[2] == q.shape[2]
        if a.get("enable_gqa"):
            assert q.shape[1] % k.shape[1] == 0
        else:
            assert k.shape[1] == q.shape[1], "Hq != Hkv without enable_gqa"
        head_dim = q.shape[2]
        assert head_dim % 8 == 0 and head_dim <= 256, f"head dim {head_dim}: the kernel takes multiples of 8 to 256"
        # the last dimension contiguous (the kernel's stride check)
        for name, t in (("query", q), ("key", k), ("value", v)):
            assert t.stride(-1) == 1, f"{name} must have a contiguous last dimension"
        # cu_seqlens: int32, 1-D, contiguous, on q's device, 0 .. total, non-decreasing
        for name, cu in (("cu_seq_q", cu_q), ("cu_seq_k", cu_k)):
            assert isinstance(cu, torch.Tensor) and cu.dtype == torch.int32, f"{name} must be an int32 tensor"
            assert cu.device == q.device, f"{name} is on {cu.device}, query on {q.device}"
            assert cu.dim() == 1 and cu.is_contiguous()
            assert cu[0].item() == 0 and cu[-1].item() == q.shape[0] and bool((cu.diff() >= 0).all())
        assert torch.equal(cu_q, cu_k), "self-attention: the same boundaries for queries and keys"
        # max_seqlen: Python ints (the custom op's schema), the longest segment
        longest = int(cu_q.diff().max())
        for name in ("max_q", "max_k"):
            assert type(a[name]) is int, f"{name} must be a Python int, not {type(a[name]).__name__}"
            assert a[name] >= longest, f"{name} {a[name]} < the longest segment {longest}"
        # causal: window_size (-1, 0) in new torch (its default (-1, -1) is full attention), is_causal in old
        if "window_size" in a:
            assert tuple(a["window_size"]) == (-1, 0), f"window_size {a['window_size']} is not causal"
        else:
            assert a["is_causal"] is True
        scale = a.get("scale")
        assert scale is None or isinstance(scale, float)
        lengths = cu_q.diff().tolist()
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        parts = [F.scaled_dot_product_attention(*(t.float().transpose(0, 1)[None] for t in (qs, ks, vs)),
                                                is_causal=True, scale=scale)[0].transpose(0, 1)
                 for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True)]
        return torch.cat(parts).to(q.dtype)

    double.__signature__ = real
    return double


@pytest.fixture
def varlen_double(monkeypatch) -> list[dict]:
    """`varlen_attn` replaced by the contract double (our function imports it inside each call); its calls."""
    from torch.nn.attention import varlen

    calls: list[dict] = []
    monkeypatch.setattr(varlen, "varlen_attn", contract_varlen_attn(calls))
    return calls


def test_contract_double_refuses_what_the_kernel_refuses(varlen_double):
    from torch.nn.attention import varlen

    q = torch.randn(10, 2, 16, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    causal = _causal_kwargs(varlen.varlen_attn)
    out = varlen.varlen_attn(q, q, q, cu, cu, 6, 6, **causal)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    bad = [((q, q.float(), q, cu, cu, 6, 6), "dtypes differ"), ((q.float(),) * 3 + (cu, cu, 6, 6), "fp16 or bf16"),
           ((q, q, q, cu.long(), cu.long(), 6, 6), "int32"), ((q, q, q, cu, cu, torch.tensor(6), 6), "Python int"),
           ((q[..., :12].contiguous(),) * 3 + (cu, cu, 6, 6), "multiples of 8"),
           ((q[..., ::2],) * 3 + (cu, cu, 6, 6), "contiguous last dimension")]
    for args, why in bad:
        with pytest.raises(AssertionError, match=why):
            varlen.varlen_attn(*args, **causal)
    with pytest.raises(AssertionError, match="not causal"):
        varlen.varlen_attn(q, q, q, cu, cu, 6, 6)


@pytest.mark.parametrize("precision", ["bf16 model", "fp32 model under bf16 autocast"])
def test_varlen_forward_and_backward_through_the_kernel_contract_match_sdpa(precision, varlen_double, shard_corpus,
                                                                           special):
    """The model's forward and backward on a packed batch through the varlen backend, its kernel replaced by the
    contract double, on the CPU: every call keeps the kernel's contract (one dtype of fp16/bf16, int32 boundaries,
    int lengths, causal), and the losses and gradients are the `sdpa` backend's, to bf16's precision."""
    from model.config import preset_config
    from model.janus import JanusProForTraining

    config = DataConfig(data=[str(shard_corpus[t]) for t in ("understanding", "text", "generation")],
                        ratio=[2, 3, 5], seq_len=1400, rows_per_micro_batch=2)
    batch = next(iter(DataPipeline(config, special)))
    assert len(batch.segment_lengths) > 2

    def losses_and_grads(backend: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
        autocast = precision.startswith("fp32")
        if not autocast:
            model = model.to(torch.bfloat16)
        use_attention(model, backend)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(batch)
            out.loss_sum.float().sum().backward()
        return out.token_loss.detach().float(), [p.grad.float() for p in model.parameters() if p.grad is not None]

    reference = losses_and_grads("sdpa")
    got = losses_and_grads("varlen")
    layers = preset_config("tiny").text_config.num_hidden_layers
    assert len(varlen_double) == layers and {c["dtype"] for c in varlen_double} == {torch.bfloat16}
    has = reference[0] != 0
    assert (got[0][has] - reference[0][has]).abs().mean() < 0.02
    assert (got[0][has] - reference[0][has]).abs().max() < 0.25
    assert len(got[1]) == len(reference[1])
    for a, b in zip(got[1], reference[1], strict=True):
        assert (a - b).norm() <= 0.05 * b.norm() + 1e-6


def test_varlen_refuses_fp32_without_autocast(varlen_double):
    """The CUDA kernel takes only fp16/bf16: an fp32 model outside autocast is told so, not cast behind its back."""
    from pipeline.attention import varlen_attention_forward

    q = torch.randn(1, 2, 10, 16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match="only fp16 or bf16.*--attention sdpa"):
        varlen_attention_forward(torch.nn.Module(), q, q, q, None, cu_seq_lens_q=cu, max_length_q=6)
    assert not varlen_double


@pytest.mark.parametrize(("cuda", "flash", "expected"), [(False, True, "sdpa"), (True, False, "varlen"),
                                                          (True, True, "flash_attention_2")])
def test_training_attention_default_follows_the_device(cuda, flash, expected, monkeypatch, tmp_path):
    """Unset, `--attention` is varlen on CUDA (flash_attention_2 where flash-attn imports), sdpa on the CPU; the
    saved config.yaml records the backend used, and an explicit `--attention sdpa` stays sdpa everywhere."""
    import sys
    import types

    import yaml

    from pipeline.config import resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn") if flash else None)
    config, _ = resolve(2, ["--model", "tiny"])
    assert config.model.attention == expected
    config.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["model"]["attention"] == expected
    assert resolve(2, ["--model", "tiny", "--attention", "sdpa"])[0].model.attention == "sdpa"
