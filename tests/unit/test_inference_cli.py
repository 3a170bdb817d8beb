"""The inference commands on released weights and in a conversation (#28).

- `model.generate` / `model.chat` load deepseek-ai's original layout (before: transformers' layout only): the same
  network as training loads (model/weights.py's mapping), a plain JanusForConditionalGeneration, with the generation
  config transformers' image-mode `generate` needs, which a release in that layout does not carry.
- `model.chat --interactive` answers questions from stdin about one image, the model loaded once (before: one
  `--question`, then exit).
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import JanusForConditionalGeneration

import model.chat
from model.generate import cfg_image_ids, generation_prompt_ids, load_exported


@pytest.fixture(scope="module")
def release(tmp_path_factory, original_checkpoint, tokenizer_dir) -> Path:
    """A tiny release as deepseek-ai publishes one: original-layout weights and config with the tokenizer beside."""
    path = tmp_path_factory.mktemp("release")
    for folder in (original_checkpoint, tokenizer_dir):
        for file in folder.iterdir():
            shutil.copy(file, path / file.name)
    return path


@pytest.fixture(scope="module")
def loaded(release):
    return load_exported(release)


def test_an_original_layout_release_loads_as_training_loads_it(loaded, release, special):
    from model.weights import load_model

    released, tokenizer = loaded
    assert type(released) is JanusForConditionalGeneration and not released.training  # transformers' generate
    reference, _ = load_model(release, image_token_id=special.image_placeholder)
    ours, theirs = released.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    # Buffers outside the state dict (rotary frequencies) come from the constructor, not from a skipped init.
    buffers = dict(reference.named_buffers())
    assert all(torch.equal(b, buffers[n]) for n, b in released.named_buffers())
    ids = torch.tensor([[special.bos, 40, 41, 42]])
    with torch.no_grad():
        torch.testing.assert_close(released(input_ids=ids).logits,
                                   JanusForConditionalGeneration.forward(reference.eval(), input_ids=ids).logits)


def test_an_original_layout_release_generates_with_transformers(loaded, special):
    """Guidance 5 goes through transformers' image-mode generate, which raises without the generation config an
    export writes; given ours it matches our own loop token for token (4 tokens: the check, not the image)."""
    released, tokenizer = loaded
    config = released.generation_config
    assert (config.bos_token_id, config.pad_token_id, config.guidance_scale) == (special.bos, special.pad, 5.0)
    assert config.generation_kwargs["boi_token_id"] == special.begin_of_image
    assert config.generation_kwargs["num_image_tokens"] == 576
    prompt = generation_prompt_ids(tokenizer, "a red apple")
    vision = released.model.vision_model.config  # where transformers reads how many tokens to generate
    vision.num_image_tokens = 4
    try:
        theirs = released.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   generation_mode="image", do_sample=False)
    finally:
        vision.num_image_tokens = 576
    ours = cfg_image_ids(released, [prompt], special.pad, cfg=5.0, greedy=True, num_tokens=4)
    assert theirs.tolist() == ours.tolist()


# --- chat --interactive ---

@pytest.fixture
def asked(monkeypatch) -> list[str]:
    """The questions model.chat answers, each still answered by the real model."""
    questions: list[str] = []
    real = model.chat.answer

    def answer(m, tokenizer, image, question, *args, **kwargs):
        questions.append(question)
        return real(m, tokenizer, image, question, *args, **kwargs)

    monkeypatch.setattr(model.chat, "answer", answer)
    return questions


def chat(release: Path, tmp_path: Path, monkeypatch, stdin: bytes, *flags: str) -> None:
    Image.new("RGB", (64, 48), (30, 120, 200)).save(tmp_path / "photo.png")
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    model.chat.main(["--checkpoint", str(release), "--image", str(tmp_path / "photo.png"), "--max-new-tokens", "2",
                     "--device", "cpu", *flags])


@pytest.mark.parametrize(("stdin", "expected"), [
    (b"Where is it?\nWhat colour?\n", ["Where is it?", "What colour?"]),  # until end of input
    (b"Where is it?\nWhat colour?", ["Where is it?", "What colour?"]),  # the last line without its newline
    (b"Where is it?\n\nnot asked\n", ["Where is it?"]),  # an empty line ends it
    (b"  Where is it?  \nexit\nnot asked\n", ["Where is it?"]),  # so does `exit`
    (b"", []),
])
def test_interactive_chat_answers_each_line(stdin, expected, release, tmp_path, monkeypatch, asked, capsys):
    chat(release, tmp_path, monkeypatch, stdin, "--question", "What is this?", "--interactive")
    assert asked == ["What is this?", *expected]
    assert capsys.readouterr().err == ""


def test_interactive_chat_needs_no_first_question(release, tmp_path, monkeypatch, asked):
    chat(release, tmp_path, monkeypatch, b"What is this?\n", "--interactive")
    assert asked == ["What is this?"]


def test_interactive_chat_skips_a_line_that_is_not_utf8(release, tmp_path, monkeypatch, asked, capsys):
    chat(release, tmp_path, monkeypatch, b"bad \xff line\nWhat colour?\n", "--interactive")
    assert asked == ["What colour?"]  # the chat went on
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: 'bad \\\\xff line'") and "not valid UTF-8" in err[0]


def test_chat_without_a_question_or_interactive_is_one_error_line(release, tmp_path, monkeypatch, asked, capsys):
    monkeypatch.setattr(model.chat, "read_image", lambda path: pytest.fail("read the image before the check"))
    with pytest.raises(SystemExit) as caught:
        model.chat.main(["--checkpoint", str(release), "--image", str(tmp_path / "photo.png")])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --question: give one, or --interactive to read questions from stdin"]
    assert asked == []
