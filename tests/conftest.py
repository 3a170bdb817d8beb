"""Shared fixtures: one small tokenizer, one tiny model, the real photographs scikit-image ships."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import skimage.data
import torch
from PIL import Image

from model.config import preset_config
from model.janus import JanusProForTraining
from model.tokenizer import SpecialTokens, build_tokenizer

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
          "hubble_deep_field.jpg", "camera.png", "logo.png")


def photo_path(name: str) -> Path:
    return Path(os.path.dirname(skimage.data.__file__)) / name


@pytest.fixture(scope="session")
def photos() -> dict[str, Image.Image]:
    """Real photographs (and a few odd modes: camera is L, logo is RGBA), loaded once."""
    out = {}
    for name in PHOTOS:
        with Image.open(photo_path(name)) as im:
            im.load()
            out[name] = im
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from model.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def special(tokenizer) -> SpecialTokens:
    return SpecialTokens.from_tokenizer(tokenizer)


@pytest.fixture(scope="session")
def tiny_model(special) -> JanusProForTraining:
    torch.manual_seed(0)
    return JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder)).eval()
