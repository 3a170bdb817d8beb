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
from transformers import JanusConfig, JanusForConditionalGeneration

from model.batch import PackedBatch
from model.head_loss import head_loss
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

    def _attention_kwargs(self, batch: PackedBatch) -> dict:
        """Varlen kernels take the packed segment boundaries (per-sample sdpa their host-side lengths); transformers'
        own sdpa a block-diagonal mask from position_ids."""
        backend = self.model.language_model.config._attn_implementation
        if backend == "sdpa":
            return {"attention_mask": packed_causal_mask(batch.position_ids)}
        if backend == "eager":
            return {}
        cu, longest = batch.cu_seqlens, batch.max_seqlen
        return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
                "segment_lengths": batch.segment_lengths}

    def forward(self, batch: PackedBatch) -> PackedLoss:
        # [B*T, D]; image inputs go in by index_copy at positions the batch brings (masked_scatter's backward
        # is a masked_select, whose size the host must read).
        embeds = self.model.get_input_embeddings()(batch.input_ids).flatten(0, 1)
        zero = embeds.new_zeros(())  # collects the 0-weighted outputs of modules run on dummy inputs

        if batch.pixel_values.shape[0] > 0:
            features = self._image_features(batch.pixel_values.to(embeds.dtype))
            embeds = embeds.index_copy(0, batch.und_at, features.flatten(0, 1).to(embeds.dtype))
        elif self.run_every_module:
            zero = zero + 0.0 * self._image_features(self._dummy_pixels(embeds)).sum()

        if batch.gen_input_ids.numel() > 0:
            gen = self._gen_embeddings(batch.gen_input_ids)
            embeds = embeds.index_copy(0, batch.gen_at, gen.to(embeds.dtype))
        elif self.run_every_module:
            zero = zero + 0.0 * self._gen_embeddings(batch.input_ids.new_zeros(1)).sum()

        # use_cache=False: with a cache, Llama ignores packed position_ids and samples see each other.
        hidden = self.model.language_model(
            inputs_embeds=embeds.view(*batch.input_ids.shape, -1), position_ids=batch.position_ids, use_cache=False,
            **self._attention_kwargs(batch)
        ).last_hidden_state.flatten(0, 1)

        # Each head runs only where it has targets: full-vocabulary logits for a whole row are GBs. Where those
        # are comes with the batch (model/batch.py): finding them here would make the host wait for the GPU.
        token_loss = hidden.new_zeros(batch.input_ids.numel(), dtype=torch.float32)
        loss_sum, task = token_loss.new_zeros(len(TASKS)), batch.task.flatten()
        # head_loss runs a head on a bounded number of targets at a time (an all-text micro-batch's logits are GBs), in
        # as many chunks for every micro-batch of this shape. Without targets it runs them empty: the branch rule above,
        # with the same module calls as when the task is present (ZeRO-3's trace of them stays valid).
        text, image = self.config.text_config.vocab_size, self.config.vq_config.num_embeddings
        for at, targets, head, vocab in ((batch.text_at, batch.text_targets, self.lm_head, text),
                                         (batch.image_at, batch.image_targets, self.model.generation_head, image)):
            if at.numel() > 0 or self.run_every_module:
                loss = head_loss(head, hidden.index_select(0, at), targets.flatten().index_select(0, at), vocab,
                                 max_targets=batch.input_ids.numel())
                token_loss = token_loss.index_put((at,), loss)
                loss_sum = loss_sum.index_add(0, task.index_select(0, at), loss)

        return PackedLoss(loss_sum=loss_sum + zero, target_count=batch.target_count,
                          token_loss=token_loss.view(batch.input_ids.shape))


def packed_causal_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] causal mask within each packed sample, a sample starting wherever positions do not go up
    by one (transformers' own rule, which it follows with a host-side check of whether the rows are packed)."""
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    sample = starts.cumsum(-1)
    causal = torch.ones(position_ids.shape[-1], position_ids.shape[-1], dtype=torch.bool,
                        device=position_ids.device).tril()
    return (causal & (sample[:, :, None] == sample[:, None, :]))[:, None]
