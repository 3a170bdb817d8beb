"""VQ assignment the original (LlamaGen) way: cosine nearest neighbour.

LlamaGen L2-normalises both the encoder output z and every codebook row before the search;
transformers' `JanusVQVAE.encode` takes argmin of plain squared distance, which differs whenever
codebook rows have unequal norms. We use transformers' modules for the weights and this for the ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.janus.modeling_janus import JanusVQVAE


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
