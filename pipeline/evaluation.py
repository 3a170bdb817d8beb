"""What a run checks as it goes, each deciding when it runs: validation losses, the sample grid and the answers to
held-out questions.

All are collective under ZeRO-3 (every forward gathers weights on every rank), so every rank calls them at
the same steps; rank 0 prints and saves. Grids and answers go where people look: TensorBoard (an event file of
their own, in the samples folder under the run's TensorBoard directory) and W&B when the run logs there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from PIL import Image

from model.chat import greedy_answer_ids
from model.generate import decode_images, generate_image_ids, image_grid
from model.images import decode_image, pixel_values
from model.manifest import Manifest, read_shard
from model.sample import TASKS, UNDERSTANDING, Sample, samples_from_table
from model.tokenizer import ASSISTANT, USER, SpecialTokens
from pipeline.attention import transformers_attention
from pipeline.config import DataConfig, LoggingConfig
from pipeline.data import DataPipeline
from pipeline.monitor import log
from pipeline.run_dir import samples_dir, samples_tensorboard_dir

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter


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


@dataclasses.dataclass(frozen=True)
class Question:
    """A held-out understanding sample asked at every Q&A: its prompt (through the first `<|Assistant|>:`), the
    images that prompt holds, and the texts shown beside the model's answer."""

    key: str
    prompt_ids: list[int]
    images: list[bytes]
    question: str
    reference: str


def held_out_questions(val_data: list[str], count: int, tokenizer) -> list[Question]:
    """The first `count` understanding samples with an image in --val-data's understanding manifests, in manifest
    and shard order: the same on every rank and at every Q&A, so a sample's answers can be read along the run."""
    special = SpecialTokens.from_tokenizer(tokenizer)
    found: list[Question] = []
    for path in map(Path, val_data):
        manifest = Manifest.read(path)
        if manifest.task != UNDERSTANDING:
            continue
        root = path if path.is_dir() else path.parent
        for shard in manifest.shards:
            table = read_shard(root / shard.file)
            for offset in range(0, table.num_rows, count):  # rows turned into Python a few at a time
                for sample in samples_from_table(table.slice(offset, count)):
                    if sample.images and sample.loss_spans:
                        found.append(question_of(sample, tokenizer, special))
                    if len(found) == count:
                        return found
    return found


def question_of(sample: Sample, tokenizer, special: SpecialTokens) -> Question:
    """The first exchange of an understanding sample: the prompt as training saw it (its system prompt included)."""
    start, end = sample.loss_spans[0]
    prompt = sample.input_ids[:start]
    image_marks = {special.begin_of_image, special.image_placeholder, special.end_of_image}
    after_images = max((i + 1 for i, t in enumerate(prompt) if t == special.end_of_image), default=0)
    shown = [t for t in prompt[after_images:] if t not in image_marks]
    # The roles may be plain tokens to this tokenizer, which skip_special_tokens keeps; the answer's colon ends it.
    question = tokenizer.decode(shown, skip_special_tokens=True).replace(ASSISTANT, "").replace(USER, "")
    return Question(key=sample.key, prompt_ids=prompt, images=sample.images[:prompt.count(special.begin_of_image)],
                    question=question.strip().removesuffix(":").strip(),
                    reference=tokenizer.decode(sample.input_ids[start:end], skip_special_tokens=True).strip())


class Sampler:
    """A PNG grid from --sample-prompts every --sample-every steps, with guidance; and the model's greedy answers to
    --qa-samples held-out understanding questions of --val-data every --qa-every steps. Each also to TensorBoard
    and, when the run logs there, W&B (at the step it was made); rank 0 writes.

    `val_data`: the run's --val-data manifests (DataConfig.val_data); without an understanding one there are no
    questions to ask."""

    def __init__(self, logging: LoggingConfig, output: str | Path, tokenizer, val_data: list[str] | None = None):
        self.every, self.prompts, self.cfg = logging.sample_every, logging.sample_prompts, logging.sample_cfg
        self.tokenizer, self.folder = tokenizer, samples_dir(output)
        self.events_dir, self.wandb_wanted = samples_tensorboard_dir(output), bool(logging.wandb_project)
        self.qa_every = logging.sample_every if logging.qa_every is None else logging.qa_every
        self.max_new_tokens = logging.qa_max_new_tokens
        self.questions = held_out_questions(val_data or [], logging.qa_samples, tokenizer) if self.qa_every else []
        if self.qa_every and not self.questions:
            log("Q&A samples skipped: --val-data holds no understanding sample with an image")
        self._writer = None
        self._images_shown = False

    def maybe_run(self, engine, step: int) -> Path | None:
        """The grid's path on a grid step; answers on a Q&A step (both on one step when the cadences meet)."""
        path = None
        if self.every and step % self.every == 0:
            path = self.grid(engine, step)
            log(f"step {step:7d}  samples {path}")
        if self.questions and self.qa_every and step % self.qa_every == 0:
            for question, reply in zip(self.questions, self.answers(engine, step), strict=True):
                log(f"step {step:7d}  Q&A {question.key}: {question.question!r} -> {reply!r}")
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
            grid = image_grid(images, columns=len(images))
            grid.save(path)
            self.writer().add_image("samples/grid", np.asarray(grid), step, dataformats="HWC")
            self.writer().flush()
            if run := self.wandb_run():
                import wandb

                run.log({"samples/grid": wandb.Image(grid, caption=" | ".join(self.prompts))}, step=step)
        return path

    @torch.no_grad()
    def answers(self, engine, step: int) -> list[str]:
        """Every rank asks every question, as many forwards each (collective under ZeRO-3); rank 0 writes."""
        engine.eval()
        with transformers_attention(engine.module):
            replies = answer_questions(engine.module, self.tokenizer, self.questions, self.max_new_tokens)
        engine.train()
        if dist.get_rank() == 0:
            self.record_answers(step, replies)
        return replies

    def record_answers(self, step: int, replies: list[str]) -> None:
        writer, first = self.writer(), not self._images_shown
        for i, (question, reply) in enumerate(zip(self.questions, replies, strict=True)):
            writer.add_text(f"qa/{i}", f"**{question.key}**\n\n**question:** {question.question}\n\n"
                                       f"**model:** {reply}\n\n**reference:** {question.reference}", step)
            if first:  # the images never change: once is enough
                for k, data in enumerate(question.images):
                    writer.add_image(f"qa/{i}/image-{k}", np.asarray(decode_image(data)), step, dataformats="HWC")
        writer.flush()
        self._images_shown = True
        if run := self.wandb_run():
            import wandb

            columns = ["key", "question", "model", "reference"]
            rows = [[q.key, q.question, r, q.reference] for q, r in zip(self.questions, replies, strict=True)]
            logged = {"qa/answers": wandb.Table(columns=columns, data=rows)}
            if first:
                logged["qa/images"] = [wandb.Image(decode_image(q.images[0]), caption=q.key) for q in self.questions]
            run.log(logged, step=step)

    def writer(self) -> SummaryWriter:
        """Rank 0's SummaryWriter, made on first use (no event file for a run that never samples)."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.events_dir))
        return self._writer

    def wandb_run(self) -> Any:
        """The W&B run the Monitor started on rank 0 (wandb.init), or None."""
        if not self.wandb_wanted:
            return None
        import wandb  # pip install '.[wandb]': the Monitor imported it already

        return wandb.run

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def understanding_modules(model) -> list[torch.nn.Module]:
    """What an answer runs: SigLIP and its aligner, the LLM (with its input embedding) and the LM head."""
    m = model.model
    return [m.vision_model, m.aligner, m.language_model, model.lm_head]


@torch.no_grad()
def answer_questions(model, tokenizer, questions: list[Question], max_new_tokens: int) -> list[str]:
    """Greedy answers, on every rank alike (collective under ZeRO-3): the understanding modules gathered once for all
    questions, and every question runs exactly `max_new_tokens` forwards, EOS or not, so no rank stops early."""
    eos = SpecialTokens.from_tokenizer(tokenizer).eos
    replies = []
    with gathered_once(understanding_modules(model)) as gathered:
        if not gathered and any(hasattr(p, "ds_id") for p in model.lm_head.parameters()):
            log("Q&A samples: the understanding modules do not fit a rank's free memory whole; gathering per call")
        for question in questions:
            pixels = pixel_values([decode_image(data) for data in question.images])
            ids = greedy_answer_ids(model, question.prompt_ids, pixels, eos, max_new_tokens, stop_at_eos=False)
            replies.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return replies


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
