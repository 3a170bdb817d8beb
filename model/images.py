"""The two Janus image transforms, pure functions on PIL images, and the pixel normalisation.

understanding: long side to 384 (bicubic, antialiased), short side padded centred with grey 127;
generation:    short side to 384, long side centre-cropped to 384.
Both then scale to [-1, 1] (mean = std = 0.5) before SigLIP or the VQ encoder.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_SIZE = 384
PAD_COLOR = (127, 127, 127)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image from any PIL mode, EXIF rotation applied, transparency composited over white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # High bit depth: rescale the real range to 8 bits (a plain convert clips at 255).
        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = Image.fromarray(((array - lo) * scale).round().astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def understanding_image(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Long side to `size`, then pad the short side centred with grey to a `size` square."""
    image = to_rgb(image)
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = max(round(width * scale), 1), max(round(height * scale), 1)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    if new_w == new_h == size:
        return resized
    canvas = Image.new("RGB", (size, size), PAD_COLOR)
    canvas.paste(resized, ((size - new_w) // 2, (size - new_h) // 2))
    return canvas


def generation_image(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Short side to `size`, then centre-crop the long side to `size`."""
    image = to_rgb(image)
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(round(width * scale), size), max(round(height * scale), size)
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return resized.crop((left, top, left + size, top + size))


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """[N, 3, H, W] float32 in [-1, 1] from RGB images of one size."""
    array = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def encode_image(image: Image.Image, fmt: str = "jpeg") -> bytes:
    """Bytes of a transformed image for storage; JPEG q98 4:4:4 keeps >= 46 dB at half PNG's size."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=98, subsampling=0)
    elif fmt in ("png", "webp"):
        image.save(buffer, format=fmt.upper(), **({"lossless": True} if fmt == "webp" else {}))
    else:
        raise ValueError(f"unknown image format {fmt!r}; use jpeg, png or webp")
    return buffer.getvalue()


def decode_image(data: bytes) -> Image.Image:
    return to_rgb(Image.open(io.BytesIO(data)))
