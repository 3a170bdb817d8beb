"""From samples to the tensors of a packed batch: several samples of any task per row.

Which samples share a row is the packer's choice (pipeline/); how a chosen row becomes tensors is
defined here, next to the token layout it follows. Positions restart at 0 for every sample, which
is what makes attention block-diagonal (transformers' sdpa derives the mask from `position_ids`; varlen kernels
take `cu_seqlens`, per-sample sdpa the host-side `segment_lengths`).

Where the targets are and how many each task has are computed here, on the CPU, and travel with the batch:
the forward then needs no boolean-mask indexing or counting on the device, each of which makes the host
wait for the GPU (the forward's sizes would depend on values only the device has).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from model.images import decode_image, pixel_values
from model.sample import GENERATION, TASK_INDEX, TASKS, UNDERSTANDING, Sample
from model.tokenizer import SpecialTokens

IGNORE = -100


@dataclass
class PackedBatch:
    input_ids: torch.Tensor       # [B, T] text ids; image positions hold placeholder/pad ids
    position_ids: torch.Tensor    # [B, T] restarting at 0 per sample
    pixel_values: torch.Tensor    # [N, 3, H, W] understanding images, in row order
    gen_input_ids: torch.Tensor   # [M] VQ ids at the gen_at positions, in their order
    text_targets: torch.Tensor    # [B, T] id the LM head must predict at t, IGNORE if none
    image_targets: torch.Tensor   # [B, T] VQ id the generation head must predict at t, IGNORE if none
    task: torch.Tensor            # [B, T] TASK_INDEX of the sample at t (-1 on row padding)
    sample_index: torch.Tensor    # [B, T] which packed sample t belongs to (-1 on row padding)
    cu_seqlens: torch.Tensor      # [S + 1] int32 segment starts over the flattened B*T tokens
    max_seqlen: int
    segment_lengths: tuple[int, ...]  # the S segment lengths, on the host (splitting by them reads no device)
    und_at: torch.Tensor          # [N * 576] flat positions (b * T + t) taking aligner(SigLIP(image)), ascending
    gen_at: torch.Tensor          # [M] flat positions taking gen_aligner(gen_embed(id)), ascending
    text_at: torch.Tensor         # [Nt] flat positions with a text target, ascending
    image_at: torch.Tensor        # [Ni] flat positions with an image target, ascending
    target_count: torch.Tensor    # [len(TASKS)] loss targets per task (the forward's `target_count`)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PackedBatch:
        """The batch on `device`, floating-point tensors in `dtype` if given. To a GPU the copies do not block the
        host: from pinned memory (`pin_memory`) they are asynchronous, and a blocking copy would first wait for
        everything queued on the device."""
        non_blocking = torch.device(device).type == "cuda"

        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype=dtype if dtype is not None and t.is_floating_point() else None,
                        non_blocking=non_blocking)

        return self._map(move)

    def pin_memory(self) -> PackedBatch:
        """The batch in page-locked host memory, for the data path's worker thread to call so the training thread
        does not. Without CUDA the batch itself: pinning needs the CUDA runtime."""
        if not torch.cuda.is_available():
            return self
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn) -> PackedBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PackedBatch(**{k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in values.items()})


@dataclass
class _Layout:
    input_ids: list[int]
    text_targets: list[int]
    image_targets: list[int]
    und_mask: list[bool]
    gen_mask: list[bool]


def sample_layout(sample: Sample, special: SpecialTokens, eoi_is_target: bool = False) -> _Layout:
    """The per-position inputs and targets of one sample (docs/facts.md: token layout)."""
    ids = list(sample.input_ids)
    text_targets = [IGNORE] * len(ids)
    for start, end in sample.loss_spans:
        for p in range(max(start, 1), end):
            text_targets[p - 1] = ids[p]  # position p-1 predicts token p
    image_targets = [IGNORE] * len(ids)
    gen_mask = [False] * len(ids)
    if sample.task == GENERATION:
        # <begin_of_image> predicts id 0; image position k predicts id k+1.
        n = len(sample.image_ids)
        image_targets[-1] = sample.image_ids[0]
        image_targets += list(sample.image_ids[1:]) + [IGNORE]
        text_targets += [IGNORE] * n
        gen_mask += [True] * n
        ids += [special.pad] * n
        if eoi_is_target:
            text_targets[-1] = special.end_of_image
            ids.append(special.end_of_image)
            text_targets.append(IGNORE)
            image_targets.append(IGNORE)
            gen_mask.append(False)
    und_mask = [sample.task == UNDERSTANDING and t == special.image_placeholder for t in ids]
    return _Layout(ids, text_targets, image_targets, und_mask, gen_mask)


def sample_length(sample: Sample, eoi_is_target: bool = False) -> int:
    """Tokens the sample occupies in a row."""
    extra = len(sample.image_ids) + int(eoi_is_target) if sample.task == GENERATION else 0
    return len(sample.input_ids) + extra


def pack_rows(rows: list[list[Sample]], seq_len: int | None, special: SpecialTokens,
              eoi_is_target: bool = False) -> PackedBatch:
    """Tensors for rows of whole samples, each row padded at its end to `seq_len`.

    `seq_len=None` pads to the longest row: one row is then a flat stream of exactly its samples, with no
    padding to compute (the training data path's default; the varlen kernels take any length).
    """
    B = len(rows)
    if seq_len is None:
        seq_len = max(sum(sample_length(s, eoi_is_target) for s in row) for row in rows)
    input_ids = torch.full((B, seq_len), special.pad, dtype=torch.long)
    position_ids = torch.zeros((B, seq_len), dtype=torch.long)
    text_targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    image_targets = torch.full((B, seq_len), IGNORE, dtype=torch.long)
    und_mask = torch.zeros((B, seq_len), dtype=torch.bool)
    gen_mask = torch.zeros((B, seq_len), dtype=torch.bool)
    task = torch.full((B, seq_len), -1, dtype=torch.long)
    sample_index = torch.full((B, seq_len), -1, dtype=torch.long)
    images, gen_ids, seqlens = [], [], []
    k = 0
    for b, row in enumerate(rows):
        offset = 0
        for sample in row:
            lay = sample_layout(sample, special, eoi_is_target)
            n = len(lay.input_ids)
            if offset + n > seq_len:
                raise ValueError(f"samples of row {b} need more than seq_len={seq_len} tokens")
            span = slice(offset, offset + n)
            input_ids[b, span] = torch.tensor(lay.input_ids)
            position_ids[b, span] = torch.arange(n)
            text_targets[b, span] = torch.tensor(lay.text_targets)
            image_targets[b, span] = torch.tensor(lay.image_targets)
            und_mask[b, span] = torch.tensor(lay.und_mask)
            gen_mask[b, span] = torch.tensor(lay.gen_mask)
            task[b, span] = TASK_INDEX[sample.task]
            sample_index[b, span] = k
            images += [decode_image(data) for data in sample.images] if sample.task == UNDERSTANDING else []
            gen_ids += sample.image_ids if sample.task == GENERATION else []
            seqlens.append(n)
            offset += n
            k += 1
        if offset < seq_len:  # the padding tail is a segment of its own, attending only to itself
            position_ids[b, offset:] = torch.arange(seq_len - offset)
            seqlens.append(seq_len - offset)
    cu_seqlens = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(seqlens), 0)
    return PackedBatch(
        input_ids=input_ids, position_ids=position_ids,
        pixel_values=pixel_values(images) if images else torch.zeros(0, 3, 1, 1),
        gen_input_ids=torch.tensor(gen_ids, dtype=torch.long),
        text_targets=text_targets, image_targets=image_targets, task=task, sample_index=sample_index,
        cu_seqlens=cu_seqlens, max_seqlen=max(seqlens), segment_lengths=tuple(seqlens),
        und_at=und_mask.flatten().nonzero().flatten(), gen_at=gen_mask.flatten().nonzero().flatten(),
        **target_positions(text_targets, image_targets, task),
    )


def target_positions(text_targets: torch.Tensor, image_targets: torch.Tensor, task: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
    """A batch's `text_at`, `image_at` and `target_count`, from its [B, T] CPU tensors."""
    text, image = text_targets.flatten() != IGNORE, image_targets.flatten() != IGNORE
    return {"text_at": text.nonzero().flatten(), "image_at": image.nonzero().flatten(),
            "target_count": torch.bincount(task.flatten()[text | image], minlength=len(TASKS))}
