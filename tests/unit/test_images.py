import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, UnidentifiedImageError
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from model.images import (
    ACCEPTED_FORMATS,
    decode_image,
    encode_image,
    generation_image,
    pixel_values,
    psnr,
    to_rgb,
    understanding_image,
)
from tests.support import MINIMAL_EPS, REPO


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


@pytest.mark.parametrize("size", [(1000, 37), (37, 1000), (385, 384), (2001, 1999)])
def test_generation_of_odd_aspects_matches_resize_then_crop(photos, size):
    """The crop box is computed in source pixels: near-square and extreme strips land on the same pixels."""
    photo = to_rgb(photos["astronaut.png"]).resize(size, Image.Resampling.BICUBIC)
    ours = pixel_values([generation_image(photo)])[0].numpy()
    assert psnr(ours, reference_generation(photo)) >= 45


# Peak memory of each step, read from Linux's high-water mark (VmHWM), which writing 5 to clear_refs resets to the
# current RSS: one interpreter measures every case, each from its own start.
PEAK_RSS_CHILD = """
import io, json
import numpy as np
from PIL import Image
from model.images import decode_image, generation_image, to_rgb, understanding_image

def growth_mb(step):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    status = lambda: dict(line.split(":", 1) for line in open("/proc/self/status"))
    start = int(status()["VmRSS"].split()[0])
    step()
    return (int(status()["VmHWM"].split()[0]) - start) / 1024

def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()

growth = {}
for width, height in ((50000, 32), (32, 50000)):
    data = png(np.tile(np.arange(width, dtype=np.uint8), (height, 1)))  # a few KB; 4.8 MB of pixels
    for transform in (generation_image, understanding_image):
        source = decode_image(data)
        growth[f"{transform.__name__} {width}x{height}"] = growth_mb(lambda: transform(source))
# A 16-bit strip (200 KB of PNG, 8M pixels) is rescaled to 8 bits at its own size.
source = Image.open(io.BytesIO(png(np.tile(np.arange(250000, dtype=np.uint16), (32, 1)))))
source.load()
growth["to_rgb 16-bit, per megapixel"] = growth_mb(lambda: to_rgb(source)) / 8
print(json.dumps(growth))
"""


def test_absurd_aspect_ratio_memory_is_bounded_by_the_output():
    """A 50000x32 strip is 4.8 MB decoded; resizing its short side to 384 before cropping made it 600000x384 (~1 GB).
    The transforms' own peak must stay near the 384x384 output, however long the strip; rescaling 16 bits to 8 happens
    at the source's size, so there the bound is per pixel (float64 temporaries took 25 bytes a pixel, now ~8)."""
    repo = REPO
    done = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD], cwd=repo, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    growth = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(growth) == 5
    for name, megabytes in growth.items():
        assert megabytes < (12 if "per megapixel" in name else 50), f"{name}: peak RSS grew {megabytes:.0f} MB"


@pytest.fixture
def started_processes(monkeypatch) -> list:
    """Every process start attempted while the test runs, each refused."""
    from PIL import EpsImagePlugin

    started = []

    def refuse(args, *rest, **kwargs):
        started.append(args)
        raise OSError("this test allows no subprocess")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    # As in a fresh worker: Pillow looks for Ghostscript (by running it) the first time it needs it.
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return started


def test_postscript_named_jpg_is_a_counted_skip_that_starts_nothing(started_processes, tokenizer_dir):
    from preprocess.records import GENERATION, IMAGE_UNREADABLE, ConvertConfig, convert_record

    record = {"shard": 0, "index": 0, "total": 1, "key": "cat.jpg", "images": [MINIMAL_EPS],
              "text": b"a line", "meta": "", "error": None}
    (row,) = convert_record(record, ConvertConfig(task=GENERATION, tokenizer=str(tokenizer_dir)))
    assert row["skip"] == IMAGE_UNREADABLE and "JPEG" in row["detail"]
    with pytest.raises(UnidentifiedImageError):
        decode_image(MINIMAL_EPS)
    assert started_processes == []


def test_every_accepted_format_opens(started_processes):
    from preprocess.records import GENERATION, ConvertConfig, open_image

    image = Image.new("RGB", (40, 40), (200, 30, 30))
    for fmt in ACCEPTED_FORMATS:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        assert decode_image(buffer.getvalue()).getpixel((20, 20))[0] > 150, fmt
        assert open_image(buffer.getvalue(), ConvertConfig(task=GENERATION, tokenizer="")).size == (40, 40), fmt
    assert started_processes == []


def test_chat_refuses_an_image_not_in_the_accepted_formats(tmp_path, started_processes, capsys):
    """The user's own --image is opened as data is: a PostScript file named .jpg is refused with a message naming
    the accepted formats, before any model is loaded, and nothing is run on it. Before: Image.open without formats=
    after loading the checkpoint."""
    from model.chat import main

    photo = tmp_path / "photo.jpg"
    photo.write_bytes(MINIMAL_EPS)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-checkpoint"), "--image", str(photo), "--question", "What is it?"])
    assert exit_info.value.code == 2
    assert f"--image {photo}: not an image in JPEG, PNG" in capsys.readouterr().err
    assert started_processes == []
