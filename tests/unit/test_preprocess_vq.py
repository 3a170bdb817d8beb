"""`--vq DIR`: a JanusVQVAE directory, or the VQ of a whole Janus checkpoint in either layout (no Ray here)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.config import preset_config
from model.janus import JanusProForTraining
from model.vq import load_vq


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_vq_from_vqvae_dir_and_both_checkpoint_layouts(tmp_path):
    from model import weights

    torch.manual_seed(0)
    model = JanusProForTraining(preset_config("tiny")).eval()
    vq = model.model.vqmodel
    vq.save_pretrained(tmp_path / "vqvae")
    assert same_weights(load_vq(tmp_path / "vqvae"), vq)
    for layout in ("transformers", "original"):
        weights.save_checkpoint(model, tmp_path / layout, layout=layout)
        loaded = load_vq(tmp_path / layout)
        assert isinstance(loaded, JanusVQVAE) and same_weights(loaded, vq), layout


def test_load_vq_refuses_a_directory_without_a_vq(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vq(tmp_path)
