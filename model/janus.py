"""Janus-Pro for training: transformers' Janus modules with the packed mixed-task forward.

transformers' `JanusForConditionalGeneration.forward` computes the text loss of one kind of sample.
Training needs rows that mix understanding, generation and text samples, the generation loss
through the generation head, and per-task sums for a global token mean; that is this subclass.
Parameter names are exactly transformers' (the class adds no parameters), so its checkpoints load
into `JanusForConditionalGeneration` as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import JanusConfig, JanusForConditionalGeneration

from model.batch import IGNORE, PackedBatch
from model.sample import TASKS


@dataclass
class PackedLoss:
    loss_sum: torch.Tensor      # [len(TASKS)] summed cross-entropy per task (und, text, gen)
    target_count: torch.Tensor  # [len(TASKS)] number of targets per task
    token_loss: torch.Tensor    # [B, T] loss of the target predicted at each position, 0 where none


class JanusProForTraining(JanusForConditionalGeneration):
    def __init__(self, config: JanusConfig, run_every_module: bool = True):
        super().__init__(config)
        # ZeRO-3 gathers a module's weights collectively when it runs: if one rank skips SigLIP (no
        # understanding sample in its micro-batch) while another runs it, the job hangs. So every
        # module runs in every forward, on a dummy input that adds exactly 0 where its task is absent.
        self.run_every_module = run_every_module

    def _image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model.aligner(self.model.vision_model(pixel_values).last_hidden_state)

    def _gen_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.generation_aligner(self.model.generation_embeddings(ids))

    def _dummy_pixels(self, like: torch.Tensor) -> torch.Tensor:
        size = self.config.vision_config.image_size
        return like.new_zeros(1, self.config.vision_config.num_channels, size, size)

    def _varlen_kwargs(self, batch: PackedBatch) -> dict:
        """Varlen kernels take the packed segment boundaries; sdpa derives its mask from position_ids."""
        if self.model.language_model.config._attn_implementation in ("sdpa", "eager"):
            return {}
        cu, longest = batch.cu_seqlens, batch.max_seqlen
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}

    def forward(self, batch: PackedBatch) -> PackedLoss:
        embeds = self.model.get_input_embeddings()(batch.input_ids)
        zero = embeds.new_zeros(())  # collects the 0-weighted outputs of modules run on dummy inputs

        if batch.pixel_values.shape[0] > 0:
            features = self._image_features(batch.pixel_values.to(embeds.dtype))
            embeds = embeds.masked_scatter(batch.und_image_mask.unsqueeze(-1), features.to(embeds.dtype))
        elif self.run_every_module:
            zero = zero + 0.0 * self._image_features(self._dummy_pixels(embeds)).sum()

        if batch.gen_input_ids.numel() > 0:
            gen = self._gen_embeddings(batch.gen_input_ids)
            embeds = embeds.masked_scatter(batch.gen_image_mask.unsqueeze(-1), gen.to(embeds.dtype))
        elif self.run_every_module:
            zero = zero + 0.0 * self._gen_embeddings(batch.input_ids.new_zeros(1)).sum()

        # use_cache=False: with a cache, Llama ignores packed position_ids and samples see each other.
        hidden = self.model.language_model(
            inputs_embeds=embeds, position_ids=batch.position_ids, use_cache=False, **self._varlen_kwargs(batch)
        ).last_hidden_state

        # Each head runs only where it has targets: full-vocabulary logits for a whole row are GBs.
        token_loss = hidden.new_zeros(batch.input_ids.shape, dtype=torch.float32)
        text_at = batch.text_targets != IGNORE
        image_at = batch.image_targets != IGNORE
        for at, targets, head in ((text_at, batch.text_targets, self.lm_head),
                                  (image_at, batch.image_targets, self.model.generation_head)):
            if at.any():
                logits = head(hidden[at]).float()
                token_loss = token_loss.index_put((at,), F.cross_entropy(logits, targets[at], reduction="none"))
            elif self.run_every_module:
                zero = zero + 0.0 * head(hidden[:1, :1]).sum()

        has_target = text_at | image_at
        task = batch.task[has_target]
        loss_sum = token_loss.new_zeros(len(TASKS)).index_add(0, task, token_loss[has_target]) + zero
        target_count = torch.bincount(task, minlength=len(TASKS))
        return PackedLoss(loss_sum=loss_sum, target_count=target_count, token_loss=token_loss)
