"""Export a training run's ZeRO-3 checkpoint (written by any number of ranks) as a release.

    python launchers/export.py --checkpoint RUN_DIR [--step N] --out DIR --layout {transformers,original}

- `transformers`: what `JanusForConditionalGeneration.from_pretrained` and `JanusProcessor.from_pretrained`
  load: config.json, sharded safetensors with an index, the tokenizer, processor and preprocessor configs
  (mean = std = 0.5, grey padding) and a generation config that transformers' image-mode `generate` needs
  (guidance 5, bos/pad ids, `generation_kwargs` {boi_token_id, num_image_tokens}).
- `original`: deepseek-ai's layout for the official inference code (model/weights.py), kept-aside tensors
  (SigLIP attention pool, VQ codebook usage) carried over from the run's original-layout initial weights
  when it had them, else initialised as the official code does; the tokenizer beside it.

The weights come from DeepSpeed's own consolidation (pipeline/checkpoint.py, one process, no
torch.distributed); the export refuses unless it holds every tensor of the model, frozen ones included, and
ends with SHA256SUMS over every file it wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from model.config import DTYPES, num_image_tokens
from model.janus import JanusProForTraining
from model.tokenizer import BEGIN_OF_IMAGE, END_OF_IMAGE, IMAGE_PLACEHOLDER, SpecialTokens, load_tokenizer
from model.weights import (
    LAYOUTS,
    Entry,
    Layout,
    check_fit,
    detect_layout,
    from_original,
    initial_kept_aside,
    kept_aside,
    model_tensors,
    read_entries,
    save_checkpoint,
)
from pipeline import checkpoint
from pipeline.train_config import TrainConfig

CHECKSUMS = "SHA256SUMS"
GUIDANCE_SCALE = 5.0  # the paper's and the official code's classifier-free guidance weight


@dataclass(frozen=True)
class Exported:
    path: Path
    source: Path     # the ZeRO checkpoint it came from
    tensors: int     # tensors written (the original layout fuses SigLIP's q/k/v and adds the kept-aside ones)
    files: list[str]


def run_config(run_dir: Path) -> TrainConfig:
    """The resolved configuration a run saved beside its checkpoints."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.yaml; is it a training run directory (launchers/stageN.py)?")
    return TrainConfig(**yaml.safe_load(path.read_text()))


def _initial_weights(config: TrainConfig) -> Path | None:
    """The released weights at the root of a chain of runs (each stage's --init is the previous run)."""
    seen = 0
    init = Path(config.init) if config.init else None
    while init is not None and (init / "checkpoints").is_dir() and seen < 16:
        parent = run_config(init)
        init, seen = (Path(parent.init) if parent.init else None), seen + 1
    return init


def _aside_for(config: TrainConfig, model_config, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The kept-aside tensors: the original initial weights' if the chain of runs started from them, else
    initialised as the official code does, from a fixed seed so that re-exports are identical (checksums too)."""
    root = _initial_weights(config)
    if root is not None and root.exists() and detect_layout(read_entries(root)) == "original":
        return {k: v.to(dtype) for k, v in kept_aside(root).items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return initial_kept_aside(model_config, dtype)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> list[str]:
    """`sha256sum -c SHA256SUMS` checks the export; returns the files it covers."""
    files = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS)
    (directory / CHECKSUMS).write_text("".join(f"{_sha256(directory / f)}  {f}\n" for f in files))
    return files


def processor_tokenizer(path: str | Path):
    """The tokenizer with the named tokens JanusProcessor reads (`image_token`, `boi_token`, `eoi_token`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), extra_special_tokens={
        "image_token": IMAGE_PLACEHOLDER, "boi_token": BEGIN_OF_IMAGE, "eoi_token": END_OF_IMAGE})


def write_inference_files(out: Path, model_config, tokenizer_dir: str | Path) -> None:
    """Tokenizer, processor and generation config of a transformers-layout export."""
    from transformers import GenerationConfig, JanusImageProcessor, JanusProcessor

    tokenizer = processor_tokenizer(tokenizer_dir)
    special = SpecialTokens.from_tokenizer(tokenizer)
    size = model_config.vision_config.image_size
    # Janus' images: long side to 384, padded with grey 127 (= 0.5 * 255), scaled to [-1, 1] (mean = std = 0.5).
    image_processor = JanusImageProcessor(size={"height": size, "width": size}, image_mean=[0.5] * 3,
                                          image_std=[0.5] * 3)
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               use_default_system_prompt=True, num_image_tokens=num_image_tokens(model_config))
    processor.save_pretrained(str(out))  # processor_config.json (with the image processor inside)
    image_processor.save_pretrained(str(out))  # preprocessor_config.json, which older readers look for
    GenerationConfig(
        bos_token_id=special.bos, eos_token_id=special.eos, pad_token_id=special.pad,
        guidance_scale=GUIDANCE_SCALE, max_new_tokens=512,
        generation_kwargs={"boi_token_id": special.begin_of_image, "num_image_tokens": num_image_tokens(model_config)},
    ).save_pretrained(str(out))


def export(run_dir: str | Path, out: str | Path, layout: Layout = "transformers", step: int | None = None,
           dtype: str = "bf16", tokenizer_dir: str | Path | None = None) -> Exported:
    """A run's checkpoint at `step` (default: its latest complete one) as a release in `layout`."""
    from pipeline.train import model_config_for  # the model config a run trains, decided in one place

    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    run_dir, out = Path(run_dir), Path(out)
    config = run_config(run_dir)
    source = checkpoint.find_checkpoint(run_dir, step)
    tokenizer_dir = tokenizer_dir or config.tokenizer or config.init
    tokenizer = load_tokenizer(tokenizer_dir)
    special = SpecialTokens.from_tokenizer(tokenizer)
    model_config = model_config_for(config, special.image_placeholder)

    state = checkpoint.consolidated_state(source)
    with torch.device("meta"):  # shapes and names only: the consolidated tensors become the parameters
        model = JanusProForTraining(model_config)
    expected = {name: tuple(t.shape) for name, t in model_tensors(model).items()}
    found = {name: Entry(tuple(t.shape), lambda t=t: t) for name, t in state.items()}
    check_fit(expected, found, source=f"consolidated ZeRO checkpoint {source}")
    model.load_state_dict({k: v.to(DTYPES[dtype]) for k, v in state.items()}, strict=True, assign=True)
    del state

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    aside = _aside_for(config, model_config, DTYPES[dtype]) if layout == "original" else None
    save_checkpoint(model, tmp, layout, aside)
    written = read_entries(tmp)
    if layout == "original":
        ours, _, unexpected = from_original(written, list(expected))
        check_fit(expected, ours, unexpected, source=f"written {tmp}")
    else:
        check_fit(expected, written, source=f"written {tmp}")
    if layout == "transformers":
        write_inference_files(tmp, model_config, tokenizer_dir)
    else:
        tokenizer.save_pretrained(str(tmp))
    (tmp / "export.json").write_text(json.dumps({"source": str(source.resolve()), "layout": layout, "dtype": dtype,
                                                 "stage": config.stage}, indent=2) + "\n")
    files = write_checksums(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)  # a reader never sees a half-written export
    return Exported(path=out, source=source, tensors=len(written), files=files)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Export a training run's ZeRO-3 checkpoint as a release.")
    parser.add_argument("--checkpoint", required=True, help="a training run directory (OUTPUT of launchers/stageN.py)")
    parser.add_argument("--step", type=int, default=None, help="which complete checkpoint (default: the latest)")
    parser.add_argument("--out", required=True, help="output directory (replaced)")
    parser.add_argument("--layout", choices=LAYOUTS, default="transformers")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokenizer", default=None, help="default: the run's --tokenizer or --init")
    args = parser.parse_args(argv)
    result = export(args.checkpoint, args.out, args.layout, args.step, args.dtype, args.tokenizer)
    print(f"exported {result.source} -> {result.path} ({args.layout} layout, {args.dtype}, {result.tensors} tensors, "
          f"{len(result.files)} files, checksums in {result.path / CHECKSUMS})")
