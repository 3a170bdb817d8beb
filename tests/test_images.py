import io

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from model.images import (
    decode_image,
    encode_image,
    generation_image,
    pixel_values,
    psnr,
    to_rgb,
    understanding_image,
)


def test_understanding_matches_transformers(photos):
    processor = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for name, photo in photos.items():
        ours = pixel_values([understanding_image(photo)])[0].numpy()
        ref = processor(to_rgb(photo), return_tensors="np")["pixel_values"][0]
        assert ours.shape == ref.shape == (3, 384, 384)
        assert psnr(ours, ref) >= 45, name


def test_understanding_pads_grey_centred(photos):
    out = np.asarray(understanding_image(photos["coffee.png"]))  # 600x400: 384x256 content, 64 px bands
    assert out.shape == (384, 384, 3)
    assert (out[:64] == 127).all() and (out[-64:] == 127).all()
    assert not (out[64:320] == 127).all()


def reference_generation(photo: Image.Image) -> np.ndarray:
    """Resize the short side with torch's antialiased bicubic, then crop the centre: an independent path."""
    rgb = to_rgb(photo)
    w, h = rgb.size
    s = 384 / min(w, h)
    nw, nh = max(round(w * s), 384), max(round(h * s), 384)
    t = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)[None].float()
    t = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True).clamp(0, 255).round()
    top, left = (nh - 384) // 2, (nw - 384) // 2
    return (t[0, :, top:top + 384, left:left + 384] / 127.5 - 1).numpy()


def test_generation_matches_resize_then_crop(photos):
    for name, photo in photos.items():
        ours = pixel_values([generation_image(photo)])[0].numpy()
        assert psnr(ours, reference_generation(photo)) >= 45, name


def odd_images() -> dict[str, Image.Image]:
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red -> white
    p_transparent = Image.new("P", (30, 40))
    p_transparent.putpalette([0, 0, 255] * 256)
    p_transparent.info["transparency"] = 0
    i16 = Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50)  # mode I;16
    exif = Image.new("RGB", (40, 20), (0, 255, 0))
    ex = exif.getexif()
    ex[0x0112] = 6  # rotate 90: the stored 40x20 image is shown 20x40
    buf = io.BytesIO()
    exif.save(buf, format="JPEG", exif=ex.tobytes())
    return {
        "1": Image.new("1", (50, 20), 1), "L": Image.new("L", (20, 50), 200),
        "LA": Image.new("LA", (30, 30), (10, 0)), "P": Image.new("P", (30, 31), 3),
        "P+transparency": p_transparent, "RGBA": rgba, "CMYK": Image.new("CMYK", (33, 20), (0, 255, 255, 0)),
        "I;16": i16, "I": Image.new("I", (20, 20), 70000), "F": Image.new("F", (20, 25), 0.5),
        "EXIF-rotated": Image.open(io.BytesIO(buf.getvalue())),
    }


@pytest.mark.parametrize("mode", list(odd_images()))
def test_every_mode_gives_rgb(mode):
    image = odd_images()[mode]
    for transform in (understanding_image, generation_image):
        out = transform(image)
        assert out.mode == "RGB" and out.size == (384, 384)


def test_mode_conversions_are_right():
    images = odd_images()
    assert to_rgb(images["RGBA"]).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(images["P+transparency"]).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(images["EXIF-rotated"]).size == (20, 40)
    sixteen = np.asarray(to_rgb(images["I;16"]))[..., 0]
    assert sixteen.min() == 0 and sixteen.max() == 255  # the 16-bit range is kept, not clipped
    assert to_rgb(images["CMYK"]).getpixel((0, 0))[0] > 200


def test_stored_image_round_trip(photos):
    image = understanding_image(photos["astronaut.png"])
    ref = pixel_values([image])[0].numpy()
    for fmt, floor in (("jpeg", 45), ("png", float("inf")), ("webp", float("inf"))):
        back = pixel_values([decode_image(encode_image(image, fmt))])[0].numpy()
        assert psnr(back, ref) >= floor, fmt
