"""The generation VQ: loading it from any checkpoint, and assignment the original (LlamaGen) way.

LlamaGen L2-normalises both the encoder output z and every codebook row before the search;
transformers' `JanusVQVAE.encode` takes argmin of plain squared distance, which differs whenever
codebook rows have unequal norms. We use transformers' modules for the weights and this for the ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import JanusVQVAEConfig
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.config import model_config
from model.images import normalised
from model.weights import detect_layout, from_original, read_entries

VQ_PREFIX = "model.vqmodel."  # where our (transformers') Janus model keeps its VQ


def load_vq(path: str | Path) -> JanusVQVAE:
    """The VQ in float32, eval mode, from a JanusVQVAE directory or a whole Janus checkpoint of either layout.

    Only the VQ's tensors are read from a whole checkpoint (a 7B checkpoint is ~15 GB; its VQ ~100 MB).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a JanusVQVAE or Janus checkpoint directory")
    if json.loads(config_file.read_text()).get("model_type") == JanusVQVAEConfig.model_type:
        return JanusVQVAE.from_pretrained(str(path), torch_dtype=torch.float32).eval()
    vq = JanusVQVAE(model_config(path).vq_config)
    names = [VQ_PREFIX + name for name in vq.state_dict()]
    entries = read_entries(path)
    if detect_layout(entries) == "original":
        entries, _, _ = from_original(entries, names)
    expected = {VQ_PREFIX + n: tuple(t.shape) for n, t in vq.state_dict().items()}
    problems = [n for n in names if n not in entries or tuple(entries[n].shape) != expected[n]]
    if problems:
        raise ValueError(f"{path}: the checkpoint's VQ tensors are missing or mis-shaped: {problems[:5]}")
    vq.load_state_dict({n[len(VQ_PREFIX):]: entries[n].read() for n in names})
    return vq.float().eval()


def nearest_code(z: torch.Tensor, codebook: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the cosine-nearest codebook row for each row of z [N, d]; chunked to bound memory."""
    codebook = F.normalize(codebook.float(), dim=-1)
    out = torch.empty(z.shape[0], dtype=torch.long, device=z.device)
    for start in range(0, z.shape[0], chunk):
        block = F.normalize(z[start:start + chunk].float(), dim=-1)
        out[start:start + chunk] = (block @ codebook.T).argmax(dim=-1)
    return out


@torch.no_grad()
def vq_encode(vq: JanusVQVAE, pixel_values: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, (H/16)*(W/16)] VQ ids in raster (row-major) order."""
    param = next(vq.parameters())
    hidden = vq.quant_conv(vq.encoder(pixel_values.to(param.device, param.dtype)))
    batch = hidden.shape[0]
    z = hidden.permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])
    return nearest_code(z, vq.quantize.embedding.weight).view(batch, -1)


@torch.no_grad()
def vq_encode_uint8(vq: JanusVQVAE, pixels: torch.Tensor) -> torch.Tensor:
    """[B, H, W, 3] uint8 -> [B, (H/16)*(W/16)] VQ ids. The images cross to the VQ's device as uint8 (a quarter of
    float32's bytes) and are normalised there."""
    return vq_encode(vq, normalised(pixels.to(next(vq.parameters()).device)))


def padded_pixels(rows: list[bytes], batch_size: int, size: int = 384) -> torch.Tensor:
    """[batch_size, size, size, 3] uint8 from raw RGB rows, zero past them: every VQ forward then has the same
    shape, so an image gets the same ids whatever it is batched with."""
    padded = np.zeros((batch_size, size, size, 3), dtype=np.uint8)
    for i, row in enumerate(rows):
        padded[i] = np.frombuffer(row, np.uint8).reshape(size, size, 3)
    return torch.from_numpy(padded)


def vq_encode_rows(vq: JanusVQVAE, rows: list[bytes], batch_size: int, size: int = 384) -> torch.Tensor:
    """VQ ids of raw RGB rows, in one forward of `batch_size` images (padded_pixels), back on the host."""
    return vq_encode_uint8(vq, padded_pixels(rows, batch_size, size))[:len(rows)].cpu()
