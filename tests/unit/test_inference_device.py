"""Inference commands (`model.generate`, `model.chat`) run where they are asked to: `--device` (default cuda where a
GPU is, in bf16 there; else the CPU in fp32), the model and its inputs moved there. Before: CPU only, no `--device`.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from PIL import Image

import model.generate


class Loaded(Exception):
    """Raised by the stand-in loader: the command got as far as loading, with these arguments."""


@pytest.fixture
def loads(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []

    def load_exported(path, dtype=torch.float32, device="cpu"):
        calls.append((dtype, torch.device(device)))
        raise Loaded

    monkeypatch.setattr(model.generate, "load_exported", load_exported)
    return calls


def run_command(command: str, flags: list[str], tmp_path) -> None:
    from model import chat

    if command == "generate":
        argv = ["--checkpoint", str(tmp_path), "--prompt", "a cat"]
        main = model.generate.main
    else:
        Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "photo.png")
        argv = ["--checkpoint", str(tmp_path), "--image", str(tmp_path / "photo.png"), "--question", "What?"]
        main = chat.main
    main(argv + flags)


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(("cuda", "flags", "expected"), [
    (True, [], (torch.bfloat16, torch.device("cuda"))),
    (False, [], (torch.float32, torch.device("cpu"))),
    (True, ["--device", "cpu"], (torch.float32, torch.device("cpu"))),
    (True, ["--device", "cuda:1", "--dtype", "fp32"], (torch.float32, torch.device("cuda:1"))),
    (False, ["--device", "cpu", "--dtype", "bf16"], (torch.bfloat16, torch.device("cpu"))),
])
def test_device_and_dtype_defaults_follow_the_machine(command, cuda, flags, expected, loads, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    with pytest.raises(Loaded):
        run_command(command, flags, tmp_path)
    assert loads == [expected]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize(("device", "said"), [("cuda", "no CUDA GPU here"), ("cuda:1", "no CUDA GPU here"),
                                              ("tpu", "not one of cuda"), ("meta", "not one of cuda")])
def test_a_device_this_machine_lacks_is_a_usage_error_before_loading(command, device, said, loads, monkeypatch,
                                                                      tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        run_command(command, ["--device", device], tmp_path)
    assert exit_info.value.code == 2 and said in capsys.readouterr().err
    assert loads == []


def test_chat_runs_on_the_device_it_is_given(init_checkpoint, tokenizer_dir, tmp_path, capsys):
    """The real command end to end on `--device cpu`: the model is loaded there and answers."""
    from model import chat

    checkpoint = tmp_path / "release"
    shutil.copytree(init_checkpoint, checkpoint)
    for file in tokenizer_dir.iterdir():
        if file.is_file() and not (checkpoint / file.name).exists():
            shutil.copy(file, checkpoint / file.name)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "photo.png")
    chat.main(["--checkpoint", str(checkpoint), "--image", str(tmp_path / "photo.png"), "--question", "What?",
               "--device", "cpu", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.endswith("\n")


@pytest.mark.parametrize(("command", "flags", "said"), [
    ("chat", ["--question", "What\udcff?"], "--question"),  # bytes that are not UTF-8, as argv passes them
    ("chat", ["--system", "\udcff"], "--system"),
    ("chat", ["--image", "TEXT"], "--image"),  # not an image: UnidentifiedImageError
    ("chat", ["--image", "BOMB"], "DecompressionBombError"),
    ("chat", ["--image", "MISSING"], "FileNotFoundError"),
    ("generate", ["--prompt", "a \udcff cat"], "--prompt"),
    ("generate", ["--out", "DIR"], "a directory"),
    ("generate", ["--out", "TEXT/grid.png"], "is a file"),
    ("generate", ["--out", "grid.unknown"], "not an image file name"),
])
def test_argument_and_image_mistakes_are_one_error_line_before_loading(command, flags, said, loads, monkeypatch,
                                                                       tmp_path, capsys):
    """Issue #27. Before: a decompression bomb (no OSError) or an undecodable argument gave a traceback, the latter
    only after the model had loaded; an --out that could not be written failed after generating."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # the 32x32 photo is a bomb at 2 x this
    (tmp_path / "text.txt").write_text("not an image")
    (tmp_path / "dir.png").mkdir()
    names = {"TEXT": str(tmp_path / "text.txt"), "DIR": str(tmp_path / "dir.png"), "MISSING": str(tmp_path / "no.png"),
             "BOMB": str(tmp_path / "photo.png")}
    flags = [next((f.replace(k, v) for k, v in names.items() if k in f), f) for f in flags]
    with pytest.raises(SystemExit) as exit_info:
        run_command(command, ["--device", "cpu", *flags], tmp_path)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and said in err, err
    assert loads == []
