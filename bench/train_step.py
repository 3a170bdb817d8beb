"""Training-step throughput on one device: tokens/s, step time, peak memory, MFU and HFU.

    python bench/train_step.py --model 1b --device cuda [--backends sdpa varlen flash_attention_2]
                               [--checkpointing both] [--steps 10] [--layers N] [--json out.json]
    python bench/train_step.py --model tiny --device cpu --seq-len 1024 --steps 2   (what `make test` runs)

Plain PyTorch on one device (no DeepSpeed, no data loading): flat packed micro-batches of Stage II's mixture built
from synthetic samples of realistic lengths (understanding ~650 tokens with one image, generation
~590, text 50-1500), Stage II's trainable parts, AdamW, bf16 on GPU. FLOPs come from
pipeline/metrics.py, the same function the training log uses. `--layers` truncates the LLM when the
full depth does not fit (said so in the output).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch
from PIL import Image

from model.batch import PackedBatch, pack_rows, sample_length
from model.config import preset_config
from model.images import encode_image
from model.janus import JanusProForTraining
from model.sample import GENERATION, TEXT, UNDERSTANDING, Sample
from model.stages import STAGES, set_trainable
from model.tokenizer import SpecialTokens, build_tokenizer
from pipeline.attention import use_attention
from pipeline.data.packer import BufferedSample, Packer
from pipeline.metrics import BatchCounts, batch_counts, peak_flops, step_figures

BENCH_STAGE = 2  # the mixture and trainable parts benchmarked (Stage II's)


def synthetic_sample(task: str, special: SpecialTokens, rng: random.Random, vocab: int, image: bytes) -> Sample:
    words = lambda n: [rng.randrange(10, vocab) for _ in range(n)]  # noqa: E731
    if task == UNDERSTANDING:
        ids = [special.bos, *words(8), special.begin_of_image, *[special.image_placeholder] * 576,
               special.end_of_image, *words(rng.randint(10, 40))]
        answer = words(rng.randint(10, 80)) + [special.eos]
        return Sample(UNDERSTANDING, ids + answer, [(len(ids), len(ids) + len(answer))], images=[image])
    if task == GENERATION:
        ids = [special.bos, *words(rng.randint(5, 40)), special.begin_of_image]
        return Sample(GENERATION, ids, prompt_span=(1, len(ids) - 1), image_ids=words(576))
    ids = [special.bos, *words(rng.randint(50, 1500))]
    return Sample(TEXT, ids, [(1, len(ids))])


def packed_batches(n: int, rows: int, seq_len: int, special: SpecialTokens, vocab: int, seed: int = 0) -> list:
    """`n` micro-batches of Stage II's mixture (und : text : gen = 2 : 3 : 5), each one flat stream of whole samples
    up to `rows` x `seq_len` tokens, as the training data path builds them (no padding computed)."""
    rng = random.Random(seed)
    image = encode_image(Image.fromarray(np.random.default_rng(seed).integers(0, 255, (384, 384, 3), np.uint8)))
    tasks = [UNDERSTANDING] * 2 + [TEXT] * 3 + [GENERATION] * 5
    packer, batches = Packer(rows * seq_len, buffer_size=64), []
    for _ in range(n):
        while packer.needs():
            s = synthetic_sample(rng.choice(tasks), special, rng, vocab, image)
            if sample_length(s) <= seq_len:
                packer.add(BufferedSample(0, 0, 0, s, sample_length(s)))
        batches.append(pack_rows([[e.sample for e in packer.next_row()]], None, special))
    return batches


def bench_step(model_name: str, device: str, backend: str, checkpointing: bool, seq_len: int, rows: int,
               steps: int, layers: int | None, special: SpecialTokens) -> dict:
    config = preset_config(model_name, image_token_id=special.image_placeholder)
    if layers:
        config.text_config.num_hidden_layers = layers
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = JanusProForTraining(config).to(dtype)
    trainable = STAGES[BENCH_STAGE].trainable
    set_trainable(model, trainable)
    use_attention(model, backend)
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.95),
                                  weight_decay=0.0, fused=device == "cuda")
    batches = [b.to(device, dtype) for b in packed_batches(steps + 2, rows, seq_len, special,
                                                          config.text_config.vocab_size)]

    def step(batch: PackedBatch) -> None:
        out = model(batch)
        (out.loss_sum.sum() / out.target_count.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for batch in batches[:2]:  # warm-up: allocator, kernels, autotuning
        step(batch)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for batch in batches[2:]:
        step(batch)
    sync()
    seconds = (time.perf_counter() - start) / steps
    counts = sum((batch_counts(b) for b in batches[2:]), BatchCounts())
    peak = peak_flops(torch.cuda.get_device_name()) if device == "cuda" else None
    figures = step_figures(counts, seconds * steps, 1, config, trainable, checkpointing, peak)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    # device, stage and counts per step: what `python -m pipeline.planning predict --measured` rebuilds the step from
    return {"model": model_name, "layers": config.text_config.num_hidden_layers, "backend": backend,
            "checkpointing": checkpointing, "rows": rows, "seq_len": seq_len, "step_seconds": seconds,
            "peak_memory_gib": memory, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "stage": BENCH_STAGE, "counts_per_step": {k: v / steps for k, v in asdict(counts).items()},
            **figures.as_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backends", nargs="+", default=["sdpa"])
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--layers", type=int, help="LLM layers (default: the preset's full depth)")
    parser.add_argument("--json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        special = SpecialTokens.from_tokenizer(build_tokenizer(tmp))
    modes = {"on": [True], "off": [False], "both": [False, True]}[args.checkpointing]
    results = []
    print(f"{'model':<6}{'layers':>7}{'backend':>19}{'ckpt':>6}{'step s':>9}{'tok/s':>10}{'TFLOP/s':>9}"
          f"{'MFU':>7}{'HFU':>7}{'peak GiB':>10}")
    for backend in args.backends:
        for checkpointing in modes:
            r = bench_step(args.model, args.device, backend, checkpointing, args.seq_len, args.rows,
                           args.steps, args.layers, special)
            results.append(r)
            pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
            mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
            print(f"{r['model']:<6}{r['layers']:>7}{backend:>19}{'on' if checkpointing else 'off':>6}"
                  f"{r['step_seconds']:>9.3f}{r['tokens_per_s']:>10,.0f}{r['model_tflops_per_gpu']:>9.1f}"
                  f"{pct(r['mfu']):>7}{pct(r['hfu']):>7}{mem:>10}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
