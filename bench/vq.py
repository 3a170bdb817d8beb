"""VQ encoding throughput (the generation tokeniser of preprocessing): images/s per setting.

    python bench/vq.py --device cuda [--batches 8 32 128] [--iters 5] [--json out.json]
    python bench/vq.py --device cpu --preset tiny --batches 2 --iters 1     (what `make test` runs)

Settings on a GPU: fp32, TF32, bf16 (with the share of ids that agree with fp32), channels-last,
torch.compile, over a batch sweep. The VQ-16 encoder costs 312.5 GFLOP per 384x384 image (PyTorch's
FLOP counter), so images/s x 312.5e9 / peak gives the share of the card's bf16 peak reached.
Random weights stand in for the released ones: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.config import preset_config
from model.vq import vq_encode
from pipeline.metrics import peak_flops

ENCODER_FLOPS = 312.5e9  # per 384x384 image, VQ-16 encoder + quant_conv


def settings(device: str) -> list[dict]:
    if device != "cuda":
        return [{"name": "fp32", "dtype": torch.float32}]
    return [{"name": "fp32", "dtype": torch.float32, "tf32": False},
            {"name": "tf32", "dtype": torch.float32, "tf32": True},
            {"name": "bf16", "dtype": torch.bfloat16},
            {"name": "bf16+channels-last", "dtype": torch.bfloat16, "channels_last": True},
            {"name": "bf16+channels-last+compile", "dtype": torch.bfloat16, "channels_last": True, "compile": True}]


def encoder(preset: str, device: str, setting: dict) -> JanusVQVAE:
    torch.manual_seed(0)
    vq = JanusVQVAE(preset_config(preset).vq_config).eval().to(device, setting["dtype"])
    if setting.get("channels_last"):
        vq = vq.to(memory_format=torch.channels_last)
    if setting.get("compile"):
        vq.encoder = torch.compile(vq.encoder)
    return vq


def images_per_second(vq: JanusVQVAE, images: torch.Tensor, iters: int, device: str) -> tuple[float, torch.Tensor]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ids = vq_encode(vq, images)  # warm-up (and compilation)
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        ids = vq_encode(vq, images)
    sync()
    return images.shape[0] * iters / (time.perf_counter() - start), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="1b", help="whose VQ config (tiny for a quick CPU run)")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    peak = peak_flops(torch.cuda.get_device_name()) if args.device == "cuda" else None
    results, reference = [], {}
    print(f"{'setting':<28}{'batch':>6}{'images/s':>10}{'of bf16 peak':>14}{'ids = fp32':>12}")
    for setting in settings(args.device):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(setting.get("tf32"))
        vq = encoder(args.preset, args.device, setting)
        for batch in args.batches:
            torch.manual_seed(batch)
            images = torch.rand(batch, 3, 384, 384, device=args.device) * 2 - 1
            if setting.get("channels_last"):
                images = images.contiguous(memory_format=torch.channels_last)
            rate, ids = images_per_second(vq, images.to(setting["dtype"]), args.iters, args.device)
            reference.setdefault(batch, ids)
            agree = (ids == reference[batch]).float().mean().item()
            share = rate * ENCODER_FLOPS / peak if peak else None
            results.append({"setting": setting["name"], "batch": batch, "images_per_s": rate, "peak_share": share,
                            "ids_agree_with_fp32": agree})
            print(f"{setting['name']:<28}{batch:>6}{rate:>10.1f}{'-' if share is None else f'{share:.1%}':>14}"
                  f"{agree:>12.2%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
