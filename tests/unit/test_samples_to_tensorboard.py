"""Issue 29: sample grids and answers to held-out questions go where people look. One process, torch.distributed on
gloo (world size 1), a real ZeRO-3 engine on the tiny model with every parameter partitioned; the event files are
read back with TensorBoard's own reader."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator
from torch.utils.tensorboard import SummaryWriter
from transformers import JanusForConditionalGeneration

from model.chat import answer, greedy_answer_ids
from model.chat_format import JANUS_SYSTEM_PROMPT, Turn, understanding_prompt_ids, understanding_sample
from model.config import num_image_tokens, preset_config
from model.images import decode_image, encode_image, pixel_values, understanding_image
from model.janus import JanusProForTraining
from model.manifest import Manifest, tokenizer_fingerprint, write_shard
from model.sample import samples_to_table
from pipeline.config import LoggingConfig
from pipeline.evaluation import Sampler, held_out_questions
from pipeline.run_dir import samples_tensorboard_dir, tensorboard_dir
from tests.support import free_port

QUESTIONS = [("chelsea.png", "What animal is this?", "A cat on a red carpet.", None),
             ("coffee.png", "What is in the cup?", "Coffee, on a saucer.", JANUS_SYSTEM_PROMPT)]
ANSWER_TOKENS = 6


@pytest.fixture(scope="module")
def engine(special):
    """A ZeRO-3 engine over a tiny model whose LM head is scaled up: a fresh one answers one token over and over,
    which would make any two answers equal."""
    import deepspeed

    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1)
    plain = JanusProForTraining(model.config).eval()
    plain.load_state_dict(model.state_dict())
    # Persistence threshold 0: every parameter partitioned, as a 7B model's large ones are.
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                    "stage3_model_persistence_threshold": 0},
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}}
    ds_engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=list(model.parameters()))
    assert all(hasattr(p, "ds_id") for p in ds_engine.module.parameters())
    yield ds_engine, plain
    dist.destroy_process_group()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def val_understanding(tmp_path_factory, tokenizer, photos) -> Path:
    """A held-out understanding manifest of QUESTIONS (one with the default system prompt), after a row with no
    image (a text-only conversation), which is not asked."""
    rows = [understanding_sample(tokenizer, [Turn("user", "Say hi."), Turn("assistant", "Hi.")], [], key="no-image")]
    rows += [understanding_sample(tokenizer, [Turn("user", f"<image_placeholder>\n{question}"),
                                              Turn("assistant", reference)],
                                  [encode_image(understanding_image(photos[photo]))], system=system, key=photo)
             for photo, question, reference, system in QUESTIONS]
    directory = tmp_path_factory.mktemp("val-und")
    manifest = Manifest(task="understanding", tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
    manifest.shards.append(write_shard(samples_to_table(rows), directory / "und-00000.arrow"))
    manifest.rows_in = manifest.rows_written = len(rows)
    manifest.write(directory)
    return directory


def accumulator(folder: Path) -> event_accumulator.EventAccumulator:
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.IMAGES: 0,
                                                                            event_accumulator.TENSORS: 0})
    events.Reload()
    return events


def texts(events: event_accumulator.EventAccumulator, tag: str) -> list[tuple[int, str]]:
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(tag)]


def test_greedy_answer_loop_is_chats_transformers_generate_token_for_token(engine, tokenizer, special, photos):
    """The Q&A's own loop (which also drives the training subclass) against model.chat's `answer` (transformers'
    generate) on the same weights, for two photos whose answers differ."""
    _, plain = engine
    reference = JanusForConditionalGeneration(plain.config).eval()
    reference.load_state_dict(plain.state_dict())
    question = "What is in this image?"
    ids = understanding_prompt_ids(tokenizer, question, 1, JANUS_SYSTEM_PROMPT, num_image_tokens(plain.config))
    said = []
    for photo in ("chelsea.png", "astronaut.png"):
        pixels = pixel_values([understanding_image(photos[photo])])
        loop = greedy_answer_ids(plain, ids, pixels, special.eos, 12)
        assert loop == greedy_answer_ids(plain, ids, pixels, special.eos, 12, stop_at_eos=False)[:len(loop)]
        text = tokenizer.decode(loop, skip_special_tokens=True).strip()
        assert text == answer(reference, tokenizer, photos[photo], question, max_new_tokens=12)
        said.append(text)
    assert said[0] and said[0] != said[1]  # the image reaches the answer


def test_held_out_questions_are_the_first_understanding_rows_with_an_image(tokenizer, val_understanding,
                                                                           shard_corpus):
    found = held_out_questions([str(shard_corpus["text"]), str(val_understanding)], 5, tokenizer)
    assert [(q.key, q.question, q.reference) for q in found] == [(p, q, r) for p, q, r, _ in QUESTIONS]
    assert [len(q.images) for q in found] == [1, 1]
    assert [q.key for q in held_out_questions([str(val_understanding)], 1, tokenizer)] == ["chelsea.png"]


def test_grid_and_answers_reach_tensorboard_at_their_step(engine, tokenizer, special, val_understanding,
                                                          shard_corpus, tmp_path, capsys):
    ds_engine, plain = engine
    run = tmp_path / "run"
    assert Sampler(LoggingConfig(sample_every=7), run, tokenizer, val_data=[str(val_understanding)]).qa_every == 7
    logging = LoggingConfig(sample_every=6, qa_every=3, sample_prompts=["a red cube"],
                            qa_max_new_tokens=ANSWER_TOKENS)
    sampler = Sampler(logging, run, tokenizer, val_data=[str(shard_corpus["text"]), str(val_understanding)])
    # The Monitor's own writer, as a live TensorBoard sees it: polled again after the Sampler has written.
    monitor = SummaryWriter(str(tensorboard_dir(run)))
    monitor.add_scalar("loss/understanding", 1.0, 1)
    monitor.flush()
    live = accumulator(tensorboard_dir(run))

    assert sampler.maybe_run(ds_engine, 2) is None  # neither kind's step: nothing made
    assert not samples_tensorboard_dir(run).exists()
    assert sampler.maybe_run(ds_engine, 3) is None  # answers only
    live.Reload()
    monitor.add_scalar("loss/understanding", 0.5, 4)
    monitor.flush()
    live.Reload()
    # A second writer in the Monitor's folder would be the newest file there, the only one TensorBoard polls.
    assert [s.step for s in live.Scalars("loss/understanding")] == [1, 4]
    grid_path = sampler.maybe_run(ds_engine, 6)
    sampler.close()

    events = accumulator(samples_tensorboard_dir(run))
    grids = events.Images("samples/grid")
    assert [g.step for g in grids] == [6]
    shown = np.asarray(Image.open(io.BytesIO(grids[0].encoded_image_string)))
    assert shown.shape == (384, 384, 3)
    assert np.array_equal(shown, np.asarray(Image.open(grid_path)))  # HWC, the PNG's pixels

    for i, (photo, question, reference, _) in enumerate(QUESTIONS):
        said = texts(events, f"qa/{i}/text_summary")
        assert [step for step, _ in said] == [3, 6]
        row = [q for q in held_out_questions([str(val_understanding)], 2, tokenizer) if q.key == photo][0]
        pixels = pixel_values([decode_image(row.images[0])])
        expected = tokenizer.decode(greedy_answer_ids(plain, row.prompt_ids, pixels, special.eos, ANSWER_TOKENS),
                                    skip_special_tokens=True).strip()
        assert expected  # a real answer, not an empty one every model gives
        for _, text in said:
            assert f"**question:** {question}\n" in text and f"**reference:** {reference}" in text
            assert f"**model:** {expected}\n" in text  # the ZeRO-3 answer equals the plain model's
        image = events.Images(f"qa/{i}/image-0")
        assert [e.step for e in image] == [3]  # once
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image[0].encoded_image_string))),
                              np.asarray(decode_image(row.images[0])))
    out = capsys.readouterr().out
    assert "Q&A samples skipped" not in out
    assert out.count("step       3  Q&A ") == 2


def test_without_understanding_val_data_qa_is_skipped_with_one_line(tokenizer, shard_corpus, tmp_path, capsys):
    logging = LoggingConfig(sample_every=0, qa_every=5)
    sampler = Sampler(logging, tmp_path, tokenizer, val_data=[str(shard_corpus["text"])])
    assert sampler.maybe_run(None, 5) is None  # no engine needed: nothing runs
    assert capsys.readouterr().out.count("Q&A samples skipped") == 1
    assert not tensorboard_dir(tmp_path).exists()
