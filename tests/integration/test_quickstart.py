"""The README's fine-tuning quickstart, every command of its block run as written, on tiny stand-ins (#28).

The stand-ins: the hub cache holds a tiny release under `deepseek-ai/Janus-Pro-1B` (DeepSeek's original layout, and
a tokenizer that adds no BOS when encoding, as many do), which `hf download` would have put there; `llava.json`
holds 4 real photographs' conversations; `deepspeed --num_gpus 8` is 2 CPU ranks, `python` one; training commands
get a small row size appended (the presets' 16 rows of 4,096 tokens a step are hours on a CPU). Everything else
is the command as a user pastes it: the presets, relative paths, `--tokenizer` by hub id, the cache offline.

The chain also holds #28's BOS acceptance: a tokenizer without BOS goes through preprocessing, training and export,
and the export's chat template gives the training prompt token for token.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, Ranks, cache_repo

RELEASE = "deepseek-ai/Janus-Pro-1B"
# Appended to each training command: rows a CPU steps through in seconds (a flag overrides its --config file).
SMALL_ROWS = ["--seq-len", "1400", "--rows-per-step", "2", "--rows-per-micro-batch", "1", "--num-workers", "1",
              "--log-every", "1"]
QUESTIONS = {"chelsea.png": ("What animal is this?", "A tabby cat."),
             "astronaut.png": ("Who is in this photo?", "An astronaut."),
             "coffee.png": ("What drink is shown?", "Coffee."),
             "rocket.jpg": ("What is taking off?", "A rocket.")}


def quickstart_commands() -> list[str]:
    """The README block after `<!-- quickstart -->`, one command a line (continuations joined)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\n```bash\n(.*?)```", text, re.S)
    assert block, "README.md: the quickstart block is gone"
    return [line for line in block.group(1).replace("\\\n", " ").splitlines() if line.strip()]


def in_repo(word: str) -> str:
    """The repository's own files (launchers, presets) where the user's checkout has them."""
    return str(REPO / word) if word.startswith(("launchers/", "examples/")) else word


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, photos, original_checkpoint) -> Path:
    """The user's folder: llava.json with its images/, photo.jpg, and the release in the hub cache."""
    from model.tokenizer import build_tokenizer

    work = tmp_path_factory.mktemp("quickstart")
    (work / "images").mkdir()
    records = []
    for name, (question, answer) in QUESTIONS.items():
        photos[name].convert("RGB").save(work / "images" / f"{Path(name).stem}.jpg", quality=95)
        records.append({"id": Path(name).stem, "image": f"{Path(name).stem}.jpg", "conversations": [
            {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
    (work / "llava.json").write_text(json.dumps(records))
    photos["chelsea.png"].convert("RGB").save(work / "photo.jpg", quality=95)
    tokenizer = tmp_path_factory.mktemp("no-bos-tokenizer")
    build_tokenizer(tokenizer, add_bos=False)
    cache_repo(work / "hf" / "hub", RELEASE, original_checkpoint, tokenizer)
    return work


def run_command(line: str, work: Path, env: dict[str, str]) -> str:
    """One command of the block, as the user would run it (see the module docstring for the stand-ins)."""
    words = [in_repo(w) for w in shlex.split(line, comments=True)]
    if words[0] == "pip":  # installed already: this is the checkout's environment
        assert words[1:] == ["install", "-e", ".[train,preprocess]"], words
        return ""
    if words[0] == "hf":  # the cache was filled by the fixture, as the download would have
        assert words[1:] == ["download", RELEASE], words
        return ""
    if words[0] == "export":
        name, value = words[1].split("=", 1)
        env[name] = value
        return ""
    training = "--config" in words and "--dry-run" not in words
    if words[0] == "deepspeed":  # --num_gpus 8 -> 2 CPU ranks
        assert words[1:3] == ["--num_gpus", "8"], words
        return Ranks([*words[3:], *SMALL_ROWS], world_size=2, env=env, cwd=work).wait(timeout=600)[0]
    assert words[0] == "python", words
    args = [sys.executable, *words[1:], *(SMALL_ROWS if training else [])]
    if training:
        return Ranks(args[1:], world_size=1, env=env, cwd=work).wait(timeout=600)[0]
    stdin = "".join(f"{q}\n" for q, _ in QUESTIONS.values()) + "\n" if "--interactive" in words else None
    done = subprocess.run(args, cwd=work, env=env, input=stdin, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{line}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_every_quickstart_command_runs_and_the_export_prompts_as_training_did(workdir):
    env = {**os.environ, "HF_HOME": str(workdir / "hf"), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "RAY_ADDRESS"):
        env.pop(key, None)
    env["HF_HUB_OFFLINE"] = "1"  # never the network in a test: the block's own `export` comes later
    outputs = {line: run_command(line, workdir, env) for line in quickstart_commands()}
    said = "\n".join(outputs.values())

    assert re.search(r"^1 epoch = \d+ steps", said, re.M), said[-3000:]
    from pipeline.checkpoint import latest_checkpoint

    for run in ("runs/sft-und-1b", "runs/lora-und-1b-1gpu"):
        assert latest_checkpoint(workdir / run).name.startswith("step-"), run
    chat = next(out for line, out in outputs.items() if "model.chat" in line)
    assert chat.strip(), chat  # answers (a few training steps of a random tiny model: any text, newlines too)

    # The export's chat template gives the training prompt of a training sample, BOS included, although the
    # tokenizer adds none when encoding.
    from transformers import JanusProcessor

    from model.manifest import read_shard
    from model.sample import samples_from_table
    from model.tokenizer import adds_bos, load_tokenizer

    release = workdir / "release"
    assert adds_bos(load_tokenizer(release))
    (shard, *_) = sorted((workdir / "shards" / "llava").glob("*.arrow"))
    sample = next(s for s in samples_from_table(read_shard(shard)) if s.key == "chelsea")
    trained_prompt = list(sample.input_ids[:sample.loss_spans[0][0]])
    processor = JanusProcessor.from_pretrained(str(release))
    question = QUESTIONS["chelsea.png"][0]
    asked = [{"role": "user", "content": [{"type": "image", "path": str(workdir / "photo.jpg")},
                                          {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(asked, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt["input_ids"][0].tolist() == trained_prompt
