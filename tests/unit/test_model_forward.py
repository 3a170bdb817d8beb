import torch
import torch.nn.functional as F

from model.batch import IGNORE, pack_rows, sample_length
from model.sample import TASK_INDEX


@torch.no_grad()
def test_packed_row_equals_samples_alone(tiny_model, special, three_samples):
    seq_len = sum(sample_length(s) for s in three_samples) + 7  # leaves a padding tail too
    packed = tiny_model(pack_rows([three_samples], seq_len, special))
    offset = 0
    for sample in three_samples:
        n = sample_length(sample)
        alone = tiny_model(pack_rows([[sample]], n, special))
        torch.testing.assert_close(packed.token_loss[0, offset:offset + n], alone.token_loss[0], atol=1e-5, rtol=0)
        task = TASK_INDEX[sample.task]
        assert alone.target_count[task] > 0 and alone.target_count.sum() == alone.target_count[task]
        offset += n
    alone_sums = sum(tiny_model(pack_rows([[s]], sample_length(s), special)).loss_sum for s in three_samples)
    torch.testing.assert_close(packed.loss_sum, alone_sums, atol=1e-4, rtol=1e-6)
    assert packed.target_count[TASK_INDEX["generation"]] == 576


@torch.no_grad()
def test_without_restarted_positions_samples_leak(tiny_model, special, three_samples):
    seq_len = sum(sample_length(s) for s in three_samples)
    batch = pack_rows([three_samples], seq_len, special)
    good = tiny_model(batch).token_loss
    batch.position_ids = torch.arange(seq_len)[None]  # one long sequence: later samples see earlier ones
    leaky = tiny_model(batch).token_loss
    later = batch.sample_index[0] > 0
    assert (good[0, later] - leaky[0, later]).abs().max() > 1e-3


@torch.no_grad()
def test_generation_loss_is_head_on_previous_hidden_state(tiny_model, special, three_samples):
    gen = three_samples[1]
    batch = pack_rows([[gen]], sample_length(gen), special)
    out = tiny_model(batch)
    # Hand-computed: embed the prompt, then gen_aligner(gen_embed(ids)) for the 576 image positions.
    model = tiny_model.model
    ids = torch.tensor(gen.image_ids)
    prompt = model.language_model.embed_tokens(torch.tensor(gen.input_ids))
    images = model.generation_aligner(model.generation_embeddings(ids))
    hidden = model.language_model(inputs_embeds=torch.cat([prompt, images])[None], use_cache=False).last_hidden_state[0]
    boi = len(gen.input_ids) - 1
    for k in (0, 1, 300, 575):  # position boi + k holds image id k-1 (or <boi>) and predicts id k
        expected = F.cross_entropy(model.generation_head(hidden[boi + k]), ids[k])
        torch.testing.assert_close(out.token_loss[0, boi + k], expected, atol=1e-5, rtol=1e-5)
    assert batch.image_targets[0, boi + 576] == IGNORE  # the last image position predicts nothing


@torch.no_grad()
def test_end_of_image_target_is_optional(tiny_model, special, three_samples):
    gen = three_samples[1]
    off = pack_rows([[gen]], sample_length(gen), special)
    on = pack_rows([[gen]], sample_length(gen, eoi_is_target=True), special, eoi_is_target=True)
    assert (off.text_targets != IGNORE).sum() == 0
    assert on.text_targets[0, -2] == special.end_of_image and (on.text_targets != IGNORE).sum() == 1
    assert tiny_model(on).target_count.sum() == 577


def test_every_module_gets_gradient_even_when_its_task_is_absent(tiny_model, special, three_samples):
    """The ZeRO-3 branch rule: a text-only batch still runs SigLIP, the generation path and both heads."""
    batch = pack_rows([[three_samples[2]]], sample_length(three_samples[2]), special)
    tiny_model.zero_grad()
    out = tiny_model(batch)
    out.loss_sum.sum().backward()
    model = tiny_model.model
    for module in (model.vision_model, model.aligner, model.generation_embeddings, model.generation_aligner,
                   model.generation_head, tiny_model.lm_head):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads), type(module).__name__
    assert all((p.grad == 0).all() for p in model.generation_head.parameters())
    tiny_model.zero_grad()
