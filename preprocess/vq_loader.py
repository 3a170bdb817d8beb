"""Load the generation VQ for `--vq DIR`: a JanusVQVAE directory, or the VQ inside a whole Janus checkpoint.

Only the VQ's tensors are read from a whole checkpoint (a 7B checkpoint is ~15 GB; its VQ ~100 MB), with
model/weights.py's lazy reader and its original-layout name mapping (`gen_vision_model.*`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.config import model_config
from model.weights import detect_layout, from_original, read_entries

VQ_PREFIX = "model.vqmodel."  # where our (transformers') Janus model keeps its VQ


def load_vq(path: str | Path) -> JanusVQVAE:
    """The VQ in float32, eval mode. Raises with what it found when the directory is none of the known kinds."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--vq {path}: no config.json; expected a JanusVQVAE or Janus checkpoint directory")
    if json.loads(config_file.read_text()).get("model_type") == JanusVQVAEConfig.model_type:
        return JanusVQVAE.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    return _vq_from_checkpoint(path)


def _vq_from_checkpoint(path: Path) -> JanusVQVAE:
    """Only the VQ's tensors of a whole checkpoint, either layout, via model/weights.py's reader and name map."""
    vq = JanusVQVAE(model_config(path).vq_config)
    names = [VQ_PREFIX + name for name in vq.state_dict()]
    entries = read_entries(path)
    if detect_layout(entries) == "original":
        entries, _, _ = from_original(entries, names)
    expected = {VQ_PREFIX + n: tuple(t.shape) for n, t in vq.state_dict().items()}
    problems = [n for n in names if n not in entries or tuple(entries[n].shape) != expected[n]]
    if problems:
        raise ValueError(f"--vq {path}: the checkpoint's VQ tensors are missing or mis-shaped: {problems[:5]}")
    vq.load_state_dict({n[len(VQ_PREFIX):]: entries[n].read() for n in names})
    return vq.float().eval()
