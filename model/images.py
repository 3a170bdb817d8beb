"""The two Janus image transforms, pure functions on PIL images, and the pixel normalisation.

understanding: long side to 384 (bicubic, antialiased), short side padded centred with grey 127;
generation:    short side to 384, long side centre-cropped to 384.
Both then scale to [-1, 1] (mean = std = 0.5) before SigLIP or the VQ encoder.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

IMAGE_SIZE = 384
PAD_COLOR = (127, 127, 127)


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image from any PIL mode, EXIF rotation applied, transparency composited over white.

    Returns `image` itself, loaded, when it is already upright RGB (no copy): draw on a copy, not on the result.
    """
    image.load()  # decode errors surface here, as before
    image = _upright(image)
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


def _upright(image: Image.Image) -> Image.Image:
    # exif_transpose copies the whole image even when there is nothing to rotate (~0.1 ms a web photo,
    # 1% of its transform); only call it for the orientations it acts on.
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    return ImageOps.exif_transpose(image) if orientation in range(2, 9) else image


def draft_for_transform(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """For a JPEG not yet loaded: decode at the smallest DCT scale keeping both sides >= 3x `size`.

    Entropy decoding dominates large photos; JPEG can decode at 1/2, 1/4, 1/8 scale for a fraction
    of the cost. Keeping 3x the target measured >= 47 dB from a full decode on 12 MP photos (bench/
    preprocess.py); 2x fell to 41 dB there, under the 45 dB contract. A no-op for other formats.
    """
    if image.format == "JPEG":
        image.draft("RGB", (3 * size, 3 * size))
    return image


def _resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    # reducing_gap=3: a fast box reduction by an integer factor first, then bicubic over >= 3x the
    # target; indistinguishable from a full bicubic (PIL's docs) and ~3x faster on large photos.
    return image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def understanding_image(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """Long side to `size`, then pad the short side centred with grey to a `size` square."""
    image = to_rgb(image)
    width, height = image.size
    scale = size / max(width, height)
    new_w, new_h = max(round(width * scale), 1), max(round(height * scale), 1)
    resized = _resize(image, (new_w, new_h))
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
    resized = _resize(image, (new_w, new_h))
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return resized.crop((left, top, left + size, top + size))


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """[N, 3, H, W] float32 in [-1, 1] from RGB images of one size."""
    # convert() copies even an RGB image: only convert the odd one out.
    array = np.stack([np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8) for im in images])
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


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB (peak 2.0 for [-1, 1] pixels, 255 for 8-bit): the 45 dB contract."""
    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(peak**2 / mse))


def decode_image(data: bytes, size: int = IMAGE_SIZE) -> Image.Image:
    """RGB from encoded bytes, a large JPEG decoded at reduced scale (see draft_for_transform)."""
    return to_rgb(draft_for_transform(Image.open(io.BytesIO(data)), size))
