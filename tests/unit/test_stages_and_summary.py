import subprocess
import sys

import pytest

from model.stages import PARTS, STAGES, set_trainable, stage_for
from model.summary import meta_model, parameter_counts


def trainable_parts(model, stage):
    names = set_trainable(model, STAGES[stage].trainable)
    return {n.split(".")[1] if n.startswith("model.") else n.split(".")[0] for n in names}, names


def test_trainable_parts_per_stage(tiny_model):
    got, names = trainable_parts(tiny_model, 1)
    assert got == {"aligner", "generation_embeddings", "generation_aligner", "generation_head"}
    got, _ = trainable_parts(tiny_model, 2)
    assert got == {"aligner", "generation_embeddings", "generation_aligner", "generation_head",
                   "language_model", "lm_head"}
    got, names = trainable_parts(tiny_model, 3)
    assert got == {"aligner", "generation_embeddings", "generation_aligner", "generation_head",
                   "language_model", "lm_head", "vision_model"}
    assert not any(n.startswith("model.vqmodel.") for n in names)
    assert {n for n, p in tiny_model.named_parameters() if p.requires_grad} == set(names)
    for p in tiny_model.parameters():
        p.requires_grad_(True)


def test_vq_can_never_train(tiny_model):
    with pytest.raises(ValueError, match="gen_encoder"):
        set_trainable(tiny_model, ["gen_encoder"])


def test_table2_numbers():
    assert [STAGES[s].learning_rate for s in (1, 2, 3)] == [1e-3, 1e-4, 4e-5]
    assert [STAGES[s].ratio for s in (1, 2, 3)] == [(1, 0, 3), (2, 3, 5), (5, 1, 4)]
    assert stage_for(3, "7b").train_steps == 40_000 and stage_for(3, "1b").train_steps == 80_000


def expected_counts(D: int, layers: int, inter: int, V: int = 102_400) -> dict[str, int]:
    """Per-component counts from the architecture, written out independently of the model code."""
    w, vl, img, code, cdim = 1024, 24, 576, 16_384, 8
    siglip_layer = 2 * 2 * w + 4 * (w * w + w) + (w * 4 * w + 4 * w) + (4 * w * w + w)
    siglip = (3 * 16 * 16 * w + w) + img * w + vl * siglip_layer + 2 * w
    llama_layer = 4 * D * D + 3 * D * inter + 2 * D
    return {
        "und_encoder": siglip,
        "und_adaptor": (w * D + D) + (D * D + D),
        "gen_embedding": code * cdim,
        "gen_adaptor": (cdim * D + D) + (D * D + D),
        "gen_head": (D * D + D) + (D * code + code),
        "llm": V * D + layers * llama_layer + D,
        "lm_head": V * D,
    }


def vq16_count() -> int:
    """LlamaGen VQ-16: encoder, decoder, codebook and the two 1x1 convs (channel mult 1,1,2,2,4)."""
    def res(i, o):
        return 2 * i + (9 * i * o + o) + 2 * o + (9 * o * o + o) + (i * o + o if i != o else 0)

    def attn(c):
        return 2 * c + 4 * (c * c + c)

    mult, base, latent = (1, 1, 2, 2, 4), 128, 256
    enc = 3 * 9 * base + base
    block_in = base
    for level, m in enumerate(mult):
        for _ in range(2):
            enc += res(block_in, base * m) + (attn(base * m) if level == 4 else 0)
            block_in = base * m
        enc += 9 * block_in * block_in + block_in if level != 4 else 0
    mid = res(512, 512) * 2 + attn(512)
    enc += mid + 2 * 512 + (9 * 512 * latent + latent)
    dec, block_in = latent * 9 * 512 + 512 + mid, 512
    for level, m in reversed(list(enumerate(mult))):
        for _ in range(3):
            dec += res(block_in, base * m) + (attn(base * m) if level == 4 else 0)
            block_in = base * m
        dec += 9 * block_in * block_in + block_in if level != 0 else 0
    dec += 2 * base + (9 * base * 3 + 3)
    return enc + dec + 16_384 * 8 + (latent * 8 + 8) + (8 * latent + latent)


@pytest.mark.parametrize("name,D,layers,inter", [("1b", 2048, 24, 5632), ("7b", 4096, 30, 11008)])
def test_exact_parameter_counts(name, D, layers, inter):
    counts = parameter_counts(meta_model(name))
    assert set(counts) == set(PARTS)
    assert {k: v for k, v in counts.items() if k != "gen_encoder"} == expected_counts(D, layers, inter)
    assert counts["gen_encoder"] == vq16_count()


def test_summary_cli_prints_every_component():
    out = subprocess.run([sys.executable, "-m", "model.summary", "7b"], capture_output=True, text=True,
                         check=True).stdout
    assert all(part in out for part in PARTS)
    assert "6,490,935,296" in out  # the 7B language model alone
