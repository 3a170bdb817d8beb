"""What a run checks as it goes, each deciding when it runs: validation losses and the sample grid.

Both are collective under ZeRO-3 (every forward gathers weights on every rank), so every rank calls them at
the same steps; rank 0 prints and saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from PIL import Image

from model.generate import decode_images, generate_image_ids, image_grid
from model.manifest import Manifest
from model.sample import TASKS
from model.tokenizer import SpecialTokens
from pipeline.attention import transformers_attention
from pipeline.config import DataConfig, LoggingConfig
from pipeline.data import DataPipeline
from pipeline.monitor import log
from pipeline.run_dir import samples_dir


class Validator:
    """Loss per task on --val-data every --val-every steps; every rank runs the same number of batches."""

    def __init__(self, data: DataConfig, logging: LoggingConfig, special: SpecialTokens, device: torch.device,
                 **pipeline_options):
        self.every, self.batches, self.device = logging.val_every, logging.val_batches, device
        self.special, self.pipeline_options = special, pipeline_options  # fingerprints, shards verified
        tasks = [Manifest.read(m).task for m in data.val_data]
        # Held-out data as it is: every task it holds, no guidance dropout, a fixed order.
        self.data = dataclasses.replace(data, data=data.val_data, data_weights=[],
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
        # closing: the pipeline's planner thread stops with its iterator, not whenever it is collected
        data = DataPipeline(self.data, self.special, rank, world, **self.pipeline_options)
        with contextlib.closing(iter(data)) as batches:
            for batch in islice(batches, self.batches):
                out = engine(batch.to(self.device))
                sums += out.loss_sum.float()
                counts += out.target_count.float()
        engine.train()
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        return {t: (s / c).item() if c > 0 else math.nan for t, s, c in zip(TASKS, sums, counts, strict=True)}


class Sampler:
    """A PNG grid from --sample-prompts every --sample-every steps, with guidance."""

    def __init__(self, logging: LoggingConfig, output: str | Path, tokenizer):
        self.every, self.prompts, self.cfg = logging.sample_every, logging.sample_prompts, logging.sample_cfg
        self.tokenizer, self.folder = tokenizer, samples_dir(output)

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
        with transformers_attention(engine.module):
            _, images = sample_images(engine.module, self.tokenizer, self.prompts, self.cfg, seed=step)
        engine.train()
        path = self.folder / f"step-{step:08d}.png"
        if dist.get_rank() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            image_grid(images, columns=len(images)).save(path)
        return path


# ZeRO-3's post-forward hook frees a gathered parameter unless some module still holds it (its
# `ds_active_sub_modules`); a hold under an id no module has keeps it whole between module calls.
_HOLD = -1
# Share of the free memory (the least of all ranks) a whole-model gather may take: the rest is headroom for
# the KV cache and the allocator's fragmentation.
GATHER_MEMORY_SHARE = 0.8


def generation_modules(model) -> list[torch.nn.Module]:
    """What a sample grid runs: the LLM (with its input embedding), the generation path and the VQ decoder."""
    m = model.model
    return [m.language_model, m.generation_embeddings, m.generation_aligner, m.generation_head, m.vqmodel]


def gather_bytes(params: list[torch.nn.Parameter]) -> int:
    """Bytes the whole parameters take once gathered."""
    return sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in params)


def free_bytes() -> int:
    """Memory this rank can still allocate. On a GPU, the device's free memory plus what PyTorch's cache holds unused
    (after training steps the cache is most of it; NVML's free figure, which deepspeed's `available_memory` reads
    when pynvml is installed, leaves it out)."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return get_accelerator().available_memory()


def fits_every_rank(needed: int) -> bool:
    """Whether `needed` bytes fit GATHER_MEMORY_SHARE of every rank's free memory (a collective: all agree)."""
    free = torch.tensor(float(free_bytes()), device=get_accelerator().current_device_name())
    dist.all_reduce(free, op=dist.ReduceOp.MIN)
    return needed <= GATHER_MEMORY_SHARE * free.item()


@contextlib.contextmanager
def gathered_once(modules: list[torch.nn.Module]) -> Iterator[bool]:
    """The modules' ZeRO-3 parameters gathered on entry and kept whole until exit: one gather, however many
    forwards run inside. Yields whether it gathered: not without ZeRO-3, nor when they would not fit a rank's
    memory (then every module call gathers its own weights and frees them again, as without this)."""
    params = [p for module in modules for p in module.parameters() if hasattr(p, "ds_id")]
    if not params or not fits_every_rank(gather_bytes(params)):
        yield False
        return
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.add(_HOLD)
        try:
            yield True
        finally:
            for p in params:
                p.ds_active_sub_modules.discard(_HOLD)


@torch.no_grad()
def sample_images(model, tokenizer, prompts: list[str], cfg: float, seed: int
                  ) -> tuple[torch.Tensor, list[Image.Image]]:
    """A grid's ids [len(prompts), 576] and images, on every rank alike (collective under ZeRO-3).

    Without the one gather, every token of the 576 re-gathers every layer (an estimate, not measured: ~5-8 minutes
    a grid for 7B). With it, each rank holds the generation modules whole for the grid: 6.7B parameters for 7B (its
    LLM without the LM head, the generation path, the VQ), 13.3 GB in bf16 by parameter count; 1.6B and 3.1 GB for
    1B. That fits an A100-40GB beside a ZeRO-3 shard; where it does not fit every rank, each module call gathers its
    own weights again.
    """
    with gathered_once(generation_modules(model)) as gathered:
        if not gathered and any(hasattr(p, "ds_id") for p in model.model.vqmodel.parameters()):
            log("sample grid: the generation modules do not fit a rank's free memory whole; gathering per call")
        ids = generate_image_ids(model, tokenizer, prompts, cfg=cfg, seed=seed, backend="loop")
        # The VQ decoder reads its codebook's shape outside a module call, where ZeRO-3 has no hook to gather it.
        with contextlib.nullcontext() if gathered else deepspeed.zero.GatheredParameters(
                list(model.model.vqmodel.parameters())):
            images = decode_images(model, ids)
    return ids, images
