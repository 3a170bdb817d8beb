"""VQ pre-tokenisation (preprocess's generation actors): images/s per setting and batch, and the actor settings.

    python bench/vq.py --device cuda [--batches 16 32 64 128 256] [--iters 5] [--json out.json]
    python bench/vq.py --device cpu --preset tiny --batches 2 --iters 1     (what `make test` runs)

What an actor does per batch, timed: 384x384 RGB images arrive as uint8 bytes (`gen_pixels`), are stacked on the
host, cross to the device as uint8 and are normalised there (`model.vq.vq_encode_uint8`), and the ids come back.
Settings on a GPU: fp32, TF32, bf16, bf16 + channels-last, + torch.compile; each prints the share of ids that
agree with fp32 beside its speed. The VQ-16 encoder costs 312.5 GFLOP per 384x384 image (PyTorch's FLOP counter),
so images/s x 312.5e9 / peak is the share of the card's bf16 peak reached.

The choice it prints: the fastest setting whose ids agree with fp32 on >= 99.9% of tokens (the default precision
must not change what a model is trained on), at the batch where it is fastest, and actors per GPU: an actor
waits for its own host work (stacking the batch, building each row's sample) between forwards, so k actors keep
the device busy a share min(1, k x device / (host + device)) of the time: the fewest reaching 95%.
Random weights stand in for the released ones: speed does not depend on their values (agreement does; check it
again with `--vq` on the real VQ).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time

import numpy as np
import torch
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.chat_format import generation_sample
from model.config import preset_config
from model.tokenizer import build_tokenizer
from model.vq import load_vq, padded_pixels, vq_encode_uint8
from pipeline.metrics import peak_flops

ENCODER_FLOPS = 312.5e9  # per 384x384 image, VQ-16 encoder + quant_conv
SIZE = 384
AGREEMENT = 0.999  # the least share of ids equal to fp32's for a setting to be chosen
BUSY = 0.95  # the share of time the actors of one GPU should keep it computing


def settings(device: str) -> list[dict]:
    """Each setting with the preprocess flags that run it; None where the job has none (measured for reference,
    never chosen)."""
    fp32 = {"name": "fp32", "dtype": torch.float32, "tf32": False, "flags": "--vq-dtype float32"}
    if device != "cuda":
        return [fp32]
    return [fp32,
            {"name": "tf32", "dtype": torch.float32, "tf32": True, "flags": None},
            {"name": "bf16", "dtype": torch.bfloat16, "flags": "--vq-dtype bf16"},
            {"name": "bf16+channels-last", "dtype": torch.bfloat16, "channels_last": True,
             "flags": "--vq-dtype bf16 --vq-channels-last"},
            {"name": "bf16+channels-last+compile", "dtype": torch.bfloat16, "channels_last": True, "compile": True,
             "flags": None}]


def encoder(preset: str, vq_path: str | None, device: str, setting: dict) -> JanusVQVAE:
    torch.manual_seed(0)
    vq = load_vq(vq_path) if vq_path else JanusVQVAE(preset_config(preset).vq_config).eval()
    vq = vq.to(device, setting["dtype"])
    if setting.get("channels_last"):
        vq = vq.to(memory_format=torch.channels_last)
    if setting.get("compile"):
        vq.encoder = torch.compile(vq.encoder)
    return vq


def device_seconds(vq: JanusVQVAE, rows: list[bytes], iters: int, device: str) -> tuple[float, torch.Tensor]:
    """Seconds per batch from the stacked uint8 batch to ids back on the host, and the ids (stacking is host work:
    host_seconds_per_image)."""
    pixels = padded_pixels(rows, len(rows), SIZE)
    ids = vq_encode_uint8(vq, pixels).cpu()  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(iters):
        ids = vq_encode_uint8(vq, pixels).cpu()  # .cpu() waits for the device, as the actor does
    return (time.perf_counter() - start) / iters, ids


def host_seconds_per_image(rows: list[bytes], ids: torch.Tensor, iters: int) -> float:
    """The actor's host work per image: stacking its batch, and each row's generation sample (a caption tokenised)."""
    tokenizer = build_tokenizer(tempfile.mkdtemp(prefix="vq-bench-tokenizer-"))
    captions = [f"a photograph of item {i}, in soft light, on a plain grey background" for i in range(len(ids))]
    start = time.perf_counter()
    for _ in range(iters):
        padded_pixels(rows, len(rows), SIZE)
        for caption, row in zip(captions, ids.tolist(), strict=True):
            generation_sample(tokenizer, caption, row)
    return (time.perf_counter() - start) / (iters * len(ids))


def chosen(results: list[dict], host_per_image: float) -> dict:
    """The fastest setting the job can run and batch whose ids agree with fp32 enough, and the actors per GPU that
    keep it busy."""
    best = max((r for r in results if r["flags"] and r["ids_agree_with_fp32"] >= AGREEMENT),
               key=lambda r: r["images_per_s"])
    device_per_image = 1.0 / best["images_per_s"]
    return {**best, "host_ms_per_image": 1e3 * host_per_image,
            "actors_per_gpu": math.ceil(BUSY * (host_per_image + device_per_image) / device_per_image)}


def images(batches: list[int], seed: int = 0) -> dict[int, list[bytes]]:
    """Each batch size's random 384x384 RGB images, drawn once: every setting encodes the same ones, so their ids
    can be compared (drawn per setting from one generator, each setting saw other images and agreed ~0.3%)."""
    rng = np.random.default_rng(seed)
    return {batch: [rng.integers(0, 256, SIZE * SIZE * 3, dtype=np.uint8).tobytes() for _ in range(batch)]
            for batch in batches}


def agreement(ids: torch.Tensor, reference: torch.Tensor) -> float:
    """The share of ids equal to the reference's, position by position (the same images in the same order)."""
    if ids.shape != reference.shape:
        raise ValueError(f"ids {tuple(ids.shape)} against reference {tuple(reference.shape)}: not the same images")
    return (ids == reference).float().mean().item()


def measure(setting_list: list[dict], preset: str, vq_path: str | None, device: str, rows: dict[int, list[bytes]],
            iters: int, peak: float | None) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """Every setting at every batch on the same images; the first setting's ids are the reference."""
    results, reference = [], {}
    for setting in setting_list:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(setting.get("tf32"))
        vq = encoder(preset, vq_path, device, setting)
        for batch, batch_rows in rows.items():
            seconds, ids = device_seconds(vq, batch_rows, iters, device)
            reference.setdefault(batch, ids)
            agree = agreement(ids, reference[batch])
            rate = batch / seconds
            share = rate * ENCODER_FLOPS / peak if peak else None
            results.append({"setting": setting["name"], "flags": setting["flags"], "batch": batch,
                            "images_per_s": rate, "peak_share": share, "ids_agree_with_fp32": agree})
            print(f"{setting['name']:<28}{batch:>6}{rate:>10.1f}{'-' if share is None else f'{share:.1%}':>14}"
                  f"{agree:>12.2%}", flush=True)
    return results, reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="1b", help="whose VQ config (tiny for a quick CPU run)")
    parser.add_argument("--vq", help="a real VQ (JanusVQVAE or Janus checkpoint directory) instead of random weights")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    peak = peak_flops(torch.cuda.get_device_name()) if args.device == "cuda" else None
    rows = images(args.batches)
    print(f"{'setting':<28}{'batch':>6}{'images/s':>10}{'of bf16 peak':>14}{'ids = fp32':>12}")
    results, reference = measure(settings(args.device), args.preset, args.vq, args.device, rows, args.iters, peak)
    last = args.batches[-1]
    pick = chosen(results, host_seconds_per_image(rows[last], reference[last], max(1, args.iters)))
    print(f"chosen: {pick['setting']} at batch {pick['batch']} ({pick['images_per_s']:.1f} images/s, ids "
          f"{pick['ids_agree_with_fp32']:.2%} = fp32); host work {pick['host_ms_per_image']:.2f} ms per image -> "
          f"{pick['actors_per_gpu']} actor(s) per GPU\n  python -m preprocess generation ... {pick['flags']} "
          f"--vq-batch-size {pick['batch']} --vq-actors-per-gpu {pick['actors_per_gpu']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "chosen": pick}, f, indent=2)


if __name__ == "__main__":
    main()
