"""`python -m model.summary 7b`: parameter counts per component, built on the meta device."""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from transformers import JanusConfig

from model.config import PRESETS, model_config
from model.janus import JanusProForTraining
from model.stages import PARTS, part_of


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per part of PARTS (every parameter belongs to exactly one)."""
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        part = part_of(name)
        if part is None:
            raise ValueError(f"parameter {name} belongs to no part")
        counts[part] += param.numel()
    return {part: counts[part] for part in PARTS}


def meta_model(model: str | JanusConfig) -> JanusProForTraining:
    """The model on the meta device: shapes only, no memory, milliseconds even for 7B."""
    config = model if isinstance(model, JanusConfig) else model_config(model)
    with torch.device("meta"):
        return JanusProForTraining(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a checkpoint directory")
    args = parser.parse_args(argv)
    counts = parameter_counts(meta_model(args.model))
    total = sum(counts.values())
    print(f"Janus-Pro {args.model}: parameters per component")
    for part, n in counts.items():
        print(f"  {part:<14} {n:>15,}  {n / 1e6:>10.1f} M")
    print(f"  {'total':<14} {total:>15,}  {total / 1e9:>10.3f} B")


if __name__ == "__main__":
    main()
