"""Image transform throughput per CPU core: ours next to transformers' JanusImageProcessorPil, same images.

    python bench/preprocess.py [--repeat 3] [--json out.json]

Input: the real photographs scikit-image ships, as encoded files (web-size class, <= 1 MP), and the
same photos upscaled to ~12 MP and re-encoded as JPEG q95 (a stand-in for camera photos: no large
photos ship with a package here). Each path starts from the encoded bytes and ends at normalised
[-1, 1] pixels: decode, RGB, transform, scale. One thread (torch and PIL), so figures are per core.
The output is checked against the reference (PSNR >= 45 dB) in the same run.

Timing: each repeat runs one pass of every path in turn, and each path keeps its best pass, so load from
other jobs on a shared machine hits both sides alike. The "floor" column is the share of the reference's
time spent in just a full Pillow decode and the bicubic resize to 384, work a transform reaching the same
pixels from the same bytes cannot skip (ours skips part of the decode only on large JPEGs, by drafting).
The reference is the PIL backend (the torchvision one needs torchvision, not a dependency here).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time

import numpy as np
import skimage.data
import torch
from PIL import Image
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from model.images import decode_image, generation_image, open_encoded, pixel_values, psnr, to_rgb, understanding_image

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg")


def photo_bytes() -> dict[str, list[bytes]]:
    root = os.path.dirname(skimage.data.__file__)
    web = [open(os.path.join(root, name), "rb").read() for name in PHOTOS]
    large = []
    for data in web:
        image = to_rgb(open_encoded(data))
        scale = (12e6 / (image.width * image.height)) ** 0.5
        big = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        big.save(buffer, format="JPEG", quality=95)
        large.append(buffer.getvalue())
    return {"web (<= 1 MP)": web, "large (~12 MP JPEG)": large}


def ours_understanding(data: bytes) -> np.ndarray:
    return pixel_values([understanding_image(decode_image(data))])[0].numpy()


def ours_generation(data: bytes) -> np.ndarray:
    return pixel_values([generation_image(decode_image(data))])[0].numpy()


def reference_understanding(processor: JanusImageProcessorPil, data: bytes) -> np.ndarray:
    return processor(open_encoded(data).convert("RGB"), return_tensors="np")["pixel_values"][0]


def decode_and_resize(data: bytes) -> Image.Image:
    """The floor: full decode and the bicubic resize of the long side to 384, nothing else."""
    image = open_encoded(data).convert("RGB")
    scale = 384 / max(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


def rates(paths: dict, items: list[bytes], repeat: int) -> tuple[dict[str, float], dict[str, list]]:
    """Images/s of each path over `items`, best of `repeat` interleaved passes, and each path's outputs."""
    outputs = {name: [fn(x) for x in items] for name, fn in paths.items()}  # warm-up, and outputs to compare
    best = dict.fromkeys(paths, float("inf"))
    for _ in range(repeat):
        for name, fn in paths.items():
            start = time.perf_counter()
            for x in items:
                fn(x)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(items) / seconds for name, seconds in best.items()}, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    processor = JanusImageProcessorPil(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    results = []
    paths = {"reference": lambda d: reference_understanding(processor, d), "floor": decode_and_resize,
             "understanding": ours_understanding, "generation": ours_generation}
    print(f"{'size class':<22}{'path':<16}{'ours img/s':>11}{'reference':>11}{'ratio':>7}{'min PSNR':>10}{'floor':>7}")
    for size_class, items in photo_bytes().items():
        rate, out = rates(paths, items, args.repeat)
        worst = min(psnr(a, b) for a, b in zip(out["understanding"], out["reference"], strict=True))
        floor = rate["reference"] / rate["floor"]  # share of the reference's time in decode + resize
        for path in ("understanding", "generation"):
            ours, ref = rate[path], rate["reference"] if path == "understanding" else None
            results.append({"size_class": size_class, "path": path, "ours_images_per_s": ours,
                            "reference_images_per_s": ref, "ratio": ours / ref if ref else None,
                            "min_psnr_db": worst if ref else None, "decode_resize_share": floor if ref else None})
            ratio = f"{ours / ref:.2f}" if ref else "-"
            print(f"{size_class:<22}{path:<16}{ours:>11.1f}{ref or float('nan'):>11.1f}{ratio:>7}"
                  f"{(f'{worst:.1f}' if ref else '-'):>10}{(f'{floor:.0%}' if ref else '-'):>7}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
