import torch
import torch.nn.functional as F
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.config import preset_config
from model.images import generation_image, normalised, pixel_values
from model.vq import nearest_code, vq_encode, vq_encode_uint8


def test_nearest_code_is_brute_force_cosine():
    torch.manual_seed(0)
    z, codebook = torch.randn(500, 8), torch.randn(300, 8) * torch.rand(300, 1) * 5
    brute = torch.tensor([max(range(300), key=lambda j: F.cosine_similarity(v, codebook[j], dim=0)) for v in z])
    assert torch.equal(nearest_code(z, codebook, chunk=64), brute)


def test_vq_encode_on_photos_and_the_transformers_trap(photos):
    torch.manual_seed(0)
    vq = JanusVQVAE(preset_config("tiny").vq_config).eval()
    with torch.no_grad():  # codebook rows of very unequal norms, as a trained VQ has
        vq.quantize.embedding.weight.mul_(torch.logspace(-2, 1, vq.config.num_embeddings)[:, None])
    images = pixel_values([generation_image(photos[n]) for n in ("astronaut.png", "coffee.png")])
    ids = vq_encode(vq, images)
    assert ids.shape == (2, 576)
    with torch.no_grad():
        z = vq.quant_conv(vq.encoder(images)).permute(0, 2, 3, 1).reshape(-1, vq.config.embed_dim)
        cos = F.normalize(z, dim=-1) @ F.normalize(vq.quantize.embedding.weight, dim=-1).T
        assert torch.equal(ids.flatten(), cos.argmax(-1))
        plain = vq.encode(images).image_tokens.view(2, -1)  # transformers: argmin of plain distance
    assert (plain != ids).float().mean() > 0.5


def test_vq_fingerprint_is_the_same_in_any_precision_that_holds_it():
    """Preprocessing fingerprints the VQ as stored (fp32); a bf16 ZeRO-3 run holds it in bf16, a consolidated
    checkpoint as fp32 of those bf16 values: one VQ, one fingerprint. A changed weight changes it."""
    import copy

    from model.manifest import weights_fingerprint

    vq = JanusVQVAE(preset_config("tiny").vq_config).eval()
    stored = weights_fingerprint(vq)
    held = copy.deepcopy(vq).to(torch.bfloat16)
    assert weights_fingerprint(held) == stored
    assert weights_fingerprint(copy.deepcopy(held).float()) == stored
    with torch.no_grad():
        next(held.parameters()).view(-1)[0] += 1.0
    assert weights_fingerprint(held) != stored


def test_uint8_images_normalised_on_the_vq_device_get_the_same_ids(photos):
    import numpy as np

    torch.manual_seed(0)
    vq = JanusVQVAE(preset_config("tiny").vq_config).eval()
    images = [generation_image(photos[n]) for n in ("astronaut.png", "coffee.png")]
    uint8 = torch.from_numpy(np.stack([np.asarray(im) for im in images]))
    assert torch.equal(normalised(uint8), pixel_values(images))
    devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    for device in devices:
        on = vq.to(device)
        assert torch.equal(vq_encode_uint8(on, uint8).cpu(), vq_encode(on, pixel_values(images)).cpu())
    # --vq-channels-last: the same model with other convolution kernels (ids may differ only at float ties)
    last = vq_encode_uint8(vq.cpu().to(memory_format=torch.channels_last), uint8)
    assert (last == vq_encode(vq, pixel_values(images))).float().mean() > 0.99
