"""What a run checks as it goes, each deciding when it runs: validation losses and the sample grid.

Both are collective under ZeRO-3 (every forward gathers weights on every rank), so every rank calls them at
the same steps; rank 0 prints and saves.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from model.generate import decode_images, generate_image_ids, image_grid
from model.manifest import Manifest
from model.sample import TASKS
from model.tokenizer import SpecialTokens
from pipeline.config import TrainConfig
from pipeline.data import DataPipeline
from pipeline.monitor import log


class Validator:
    """Loss per task on --val-data every --val-every steps; every rank runs the same number of batches."""

    def __init__(self, config: TrainConfig, special: SpecialTokens, device: torch.device, **pipeline_options):
        self.every, self.batches, self.device = config.logging.val_every, config.logging.val_batches, device
        self.special, self.pipeline_options = special, pipeline_options  # fingerprints, shards verified
        tasks = [Manifest.read(m).task for m in config.data.val_data]
        # Held-out data as it is: every task it holds, no guidance dropout, a fixed order.
        self.data = dataclasses.replace(config.data, data=config.data.val_data, data_weights=[],
                                        ratio=[float(t in tasks) for t in TASKS], guidance_dropout=0.0,
                                        seed=12345) if tasks else None

    def maybe_run(self, engine, step: int) -> dict[str, float] | None:
        if not (self.every and self.data and step % self.every == 0):
            return None
        losses = self.losses(engine)
        log(f"step {step:7d}  validation  " + "  ".join(f"{t} {v:.4f}" for t, v in losses.items()))
        return losses

    @torch.no_grad()
    def losses(self, engine) -> dict[str, float]:
        rank, world = dist.get_rank(), dist.get_world_size()
        sums, counts = torch.zeros(len(TASKS), device=self.device), torch.zeros(len(TASKS), device=self.device)
        engine.eval()
        batches = DataPipeline(self.data, self.special, rank, world, **self.pipeline_options)
        for _, batch in zip(range(self.batches), batches, strict=False):
            out = engine(batch.to(self.device))
            sums += out.loss_sum.float()
            counts += out.target_count.float()
        engine.train()
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        return {t: (s / c).item() if c > 0 else math.nan for t, s, c in zip(TASKS, sums, counts, strict=True)}


class Sampler:
    """A PNG grid from --sample-prompts every --sample-every steps, with guidance."""

    def __init__(self, config: TrainConfig, tokenizer):
        logging = config.logging
        self.every, self.prompts, self.cfg = logging.sample_every, logging.sample_prompts, logging.sample_cfg
        self.tokenizer, self.folder = tokenizer, Path(config.checkpoint.output) / "samples"

    def maybe_run(self, engine, step: int) -> Path | None:
        if not (self.every and step % self.every == 0):
            return None
        path = self.grid(engine, step)
        log(f"step {step:7d}  samples {path}")
        return path

    @torch.no_grad()
    def grid(self, engine, step: int) -> Path:
        """Every rank generates (each step is one token for every prompt, so the ranks stay in step)."""
        engine.eval()
        ids = generate_image_ids(engine.module, self.tokenizer, self.prompts, cfg=self.cfg, seed=step, backend="loop")
        # The VQ decoder reads its codebook's shape outside a module call, where ZeRO-3 has no hook to gather it.
        with deepspeed.zero.GatheredParameters(list(engine.module.model.vqmodel.parameters())):
            images = decode_images(engine.module, ids)
        engine.train()
        path = self.folder / f"step-{step:08d}.png"
        if dist.get_rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            image_grid(images, columns=len(images)).save(path)
        return path
