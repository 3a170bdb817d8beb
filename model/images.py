"""The two Janus image transforms, pure functions on PIL images, and the pixel normalisation.

understanding: long side to 384 (bicubic, antialiased), short side padded centred with grey 127;
generation:    short side to 384, long side centre-cropped to 384.
Both then scale to [-1, 1] (mean = std = 0.5) before SigLIP or the VQ encoder.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

IMAGE_SIZE = 384
PAD_COLOR = (127, 127, 127)
# The only formats data is opened as. Without `formats=`, Image.open identifies every format Pillow has a plugin for
# by content, whatever a file is called, and loading EPS/PS runs Ghostscript on the data.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def open_encoded(data: bytes) -> Image.Image:
    """`data` opened (pixels not yet decoded) if it is one of ACCEPTED_FORMATS, else UnidentifiedImageError."""
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:  # Pillow's own message names only the buffer object
        raise UnidentifiedImageError(f"not an image in {', '.join(ACCEPTED_FORMATS)}") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit RGB image from any PIL mode, EXIF rotation applied, transparency composited over white.

    Returns `image` itself, loaded, when it is already upright RGB (no copy): draw on a copy, not on the result.
    """
    image.load()  # decode errors surface here, as before
    image = _upright(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _stretched_to_8_bits(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB") if image.mode != "RGB" else image


def _stretched_to_8_bits(image: Image.Image) -> Image.Image:
    """Mode L from a high-bit-depth image, its real range stretched to 0-255 (a plain convert clips at 255)."""
    # In place and in float32, freed before the caller converts to RGB: float64 temporaries took 25 bytes a pixel,
    # over 2 GB for a 1 MB 16-bit PNG at the pixel limit; now ~8 with the RGB result.
    array = np.array(image, dtype=np.float32)
    lo, hi = float(array.min()), float(array.max())
    array -= lo
    array *= 255.0 / (hi - lo) if hi > lo else 0.0
    return Image.fromarray(np.rint(array, out=array).astype(np.uint8), mode="L")


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
    if image.format in ("JPEG", "MPO"):  # Pillow opens a camera's multi-picture JPEG as MPO, a JPEG subclass
        image.draft("RGB", (3 * size, 3 * size))
    return image


def _resize(image: Image.Image, size: tuple[int, int],
            box: tuple[float, float, float, float] | None = None) -> Image.Image:
    # reducing_gap=3: a fast box reduction by an integer factor first, then bicubic over >= 3x the
    # target; indistinguishable from a full bicubic (PIL's docs) and ~3x faster on large photos.
    return image.resize(size, Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


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
    """Short side to `size`, then centre-crop the long side to `size`.

    Resampled straight from the kept box of the source: the sample points of resizing the whole image and then
    cropping (Pillow may round between its two passes in the other order: a level or two on photos), with memory
    bounded by the output. Resizing first scaled a 50000x32 strip to 600000x384 (~1 GB).
    """
    image = to_rgb(image)
    return _resize(image, (size, size), box=centre_crop_box(image.size, size))


def centre_crop_box(source: tuple[int, int], size: int = IMAGE_SIZE) -> tuple[float, float, float, float]:
    """The box, in source pixels, that "short side to `size`, centre-crop the long side" keeps."""
    width, height = source
    scale = size / min(width, height)
    new_w, new_h = max(round(width * scale), size), max(round(height * scale), size)
    # The per-axis scales of that resize (rounding makes them differ a little), so the box samples the same points.
    scale_x, scale_y = new_w / width, new_h / height
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return left / scale_x, top / scale_y, (left + size) / scale_x, (top + size) / scale_y


def pixel_values(images: list[Image.Image]) -> torch.Tensor:
    """[N, 3, H, W] float32 in [-1, 1] from RGB images of one size."""
    # convert() copies even an RGB image: only convert the odd one out.
    array = np.stack([np.asarray(im if im.mode == "RGB" else im.convert("RGB"), dtype=np.uint8) for im in images])
    return normalised(torch.from_numpy(array))


def normalised(pixels: torch.Tensor) -> torch.Tensor:
    """[N, H, W, 3] uint8 -> [N, 3, H, W] float32 in [-1, 1], on the tensor's own device: the same IEEE operations
    on a CPU or a GPU, so images normalised on the GPU (a quarter of the bytes cross) get the same values."""
    return pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


# Lossless WebP at its fastest method: 1.25x the bytes of Pillow's default (method 4) for ~1/18 of the encode
# time, which was more than the whole transform of a large photo (bench/preprocess_job.py's storage table). At
# method 0, Pillow's default effort (quality 80) and 100 differ by 0.2% of the bytes and ~10% of the time, in
# quality 80's favour on a quiet machine; the pixels are exact at any setting.
WEBP_LOSSLESS = {"lossless": True, "method": 0}


def encode_image(image: Image.Image, fmt: str = "jpeg") -> bytes:
    """Bytes of a transformed image for storage: webp and png exact; jpeg (q98 4:4:4) ~46 dB at half PNG's size."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=98, subsampling=0)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", **WEBP_LOSSLESS)
    elif fmt == "png":
        image.save(buffer, format="PNG")
    else:
        raise ValueError(f"unknown image format {fmt!r}; use jpeg, png or webp")
    return buffer.getvalue()


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB (peak 2.0 for [-1, 1] pixels, 255 for 8-bit): the 45 dB contract."""
    mse = float(((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2).mean())
    return float("inf") if mse == 0 else 10 * float(np.log10(peak**2 / mse))


def decode_image(data: bytes, size: int = IMAGE_SIZE) -> Image.Image:
    """RGB from encoded bytes, a large JPEG decoded at reduced scale (see draft_for_transform)."""
    return to_rgb(draft_for_transform(open_encoded(data), size))
