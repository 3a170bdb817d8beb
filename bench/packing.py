"""Packing per stage mixture: real tokens / computed tokens, flat micro-batches against padded rows.

    python bench/packing.py --corpus DIR [--micro-batches 200] [--seq-len 4096] [--rows 2] [--json out.json]
    python bench/packing.py --und DIR --text DIR --gen DIR ...      (preprocess output directories instead)

`--corpus DIR` writes (once) and reads a corpus of realistic lengths: understanding samples of one image (576
tokens) and a question and answer of 10-1,200 tokens, generation prompts of 5-300 tokens (+ 576 image tokens),
and text documents from 16 tokens to whole 4096-token pieces of long documents. Token ids are random: packing
reads only lengths. For each stage's ratio (Table 2), the same data path plans micro-batches of a budget of
`rows` x `seq_len` tokens three ways:

- flat (the default): one stream of whole samples up to the budget; computed tokens = the stream's length;
- padded rows (`--pad-rows`): `rows` rows, each padded to `seq_len`;
- pad-to-longest: the flat plan's samples batched `rows`-per-row's-worth at a time without packing, each batch
  padded to its longest sample (what packing saves over plain batching).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from model.batch import sample_length
from model.manifest import Manifest, write_shard
from model.sample import GENERATION, TEXT, UNDERSTANDING, Sample, samples_to_table
from model.stages import STAGES
from pipeline.config import DataConfig
from pipeline.data import DataPipeline

IMAGE_TOKENS = 576
VOCAB = 100_000


def realistic_samples(task: str, n: int, seq_len: int, rng: random.Random) -> list[Sample]:
    """`n` samples of `task` whose lengths follow web data's shapes (see the module docstring)."""
    def ids(k: int) -> list[int]:
        return [rng.randrange(10, VOCAB) for _ in range(k)]

    samples = []
    for i in range(n):
        if task == UNDERSTANDING:  # captions and short answers mostly, a long tail of detailed ones
            text = min(1200, int(rng.lognormvariate(np.log(80), 0.9)) + 10)
            tokens = ids(text + IMAGE_TOKENS + 2)
            samples.append(Sample(UNDERSTANDING, tokens, [(len(tokens) - text // 2, len(tokens))], images=[b"-"]))
        elif task == GENERATION:  # short labels to dense captions
            prompt = min(300, int(rng.lognormvariate(np.log(40), 0.8)) + 5)
            samples.append(Sample(GENERATION, ids(prompt + 2), prompt_span=(1, prompt + 1),
                                  image_ids=[rng.randrange(16384) for _ in range(IMAGE_TOKENS)]))
        else:  # a fifth are full pieces of long documents, the rest documents of any length
            length = seq_len if rng.random() < 0.2 else min(seq_len, int(rng.lognormvariate(np.log(400), 1.1)) + 16)
            samples.append(Sample(TEXT, ids(length), [(0, length)]))
        samples[-1] = replace(samples[-1], key=f"{task}-{i}")
    return samples


def write_corpus(root: Path, seq_len: int, per_task: int = 3000, seed: int = 0) -> dict[str, str]:
    """The realistic corpus under root/{und,text,gen} (written once), as manifest directories."""
    rng, out = random.Random(seed), {}
    for name, task in (("und", UNDERSTANDING), ("text", TEXT), ("gen", GENERATION)):
        directory = root / name
        if not (directory / "manifest.json").exists():
            directory.mkdir(parents=True, exist_ok=True)
            samples = realistic_samples(task, per_task, seq_len, rng)
            manifest = Manifest(task=task, tokenizer_fingerprint="synthetic", rows_in=len(samples),
                                rows_written=len(samples))
            manifest.shards.append(write_shard(samples_to_table(samples), directory / f"{name}-00000.arrow"))
            manifest.write(directory)
        out[name] = str(directory)
    return out


def packing_efficiency(sources: dict[str, str], ratio: tuple[int, int, int], micro_batches: int, seq_len: int,
                       rows: int, buffer_size: int = 64) -> dict:
    """Real / computed tokens of `micro_batches` planned micro-batches, flat and padded, and the flat plan's fill of
    its token budget."""
    manifests = [sources[t] for t, r in zip(("und", "text", "gen"), ratio, strict=True) if r > 0]
    config = DataConfig(data=manifests, ratio=list(ratio), seq_len=seq_len, rows_per_micro_batch=rows,
                        buffer_size=buffer_size, guidance_dropout=0.0)
    result = {}
    for name, pad_rows in (("flat", False), ("padded_rows", True)):
        pipe = DataPipeline(replace(config, pad_rows=pad_rows), special=None)
        start = time.perf_counter()
        planned = [pipe.plan_micro_batch() for _ in range(micro_batches)]
        seconds = time.perf_counter() - start
        lengths = [[[sample_length(s) for s in row] for row in mb] for mb in planned]
        real = sum(n for mb in lengths for row in mb for n in row)
        # What pack_rows builds: every row as long as --seq-len (padded rows) or as its longest row (flat).
        computed = sum(len(mb) * (seq_len if pad_rows else max(map(sum, mb))) for mb in lengths)
        result[name] = {"real_per_computed": real / computed, "budget_fill": real / (micro_batches * rows * seq_len),
                        "samples_per_micro_batch": sum(len(row) for mb in lengths for row in mb) / micro_batches,
                        "ms_per_micro_batch": 1e3 * seconds / micro_batches}
        if not pad_rows:
            flat = [n for mb in lengths for row in mb for n in row]
            per_batch = max(1, len(flat) // (micro_batches * rows))  # as many samples per padded row as packing fits
            padded = sum(max(flat[i:i + per_batch]) * len(flat[i:i + per_batch])
                         for i in range(0, len(flat), per_batch))
            result["pad_to_longest"] = {"real_per_computed": real / padded}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", help="write (once) and use the realistic-length corpus in this directory")
    parser.add_argument("--und")
    parser.add_argument("--text")
    parser.add_argument("--gen")
    parser.add_argument("--micro-batches", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--rows", type=int, default=2, help="--rows-per-micro-batch: the budget is rows x seq-len")
    parser.add_argument("--json")
    args = parser.parse_args()
    given = [args.und, args.text, args.gen]
    if any(given) and not all(given):
        parser.error("give all three of --und, --text and --gen, or none (--corpus)")
    if all(given):
        sources = {"und": args.und, "text": args.text, "gen": args.gen}
    else:
        sources = write_corpus(Path(args.corpus or tempfile.mkdtemp(prefix="packing-corpus-")), args.seq_len)
    results = {}
    print(f"real tokens / computed tokens, micro-batches of {args.rows} x {args.seq_len} tokens")
    print(f"{'stage':<7}{'ratio':<8}{'flat':>9}{'padded rows':>13}{'pad-to-longest':>16}"
          f"{'flat budget fill':>18}{'samples/mb':>12}{'ms/mb':>8}")
    for stage, table in STAGES.items():
        r = packing_efficiency(sources, table.ratio, args.micro_batches, args.seq_len, args.rows)
        results[f"stage{stage}"] = r
        flat = r["flat"]
        print(f"{stage:<7}{':'.join(map(str, table.ratio)):<8}{flat['real_per_computed']:>9.2%}"
              f"{r['padded_rows']['real_per_computed']:>13.2%}{r['pad_to_longest']['real_per_computed']:>16.2%}"
              f"{flat['budget_fill']:>18.2%}{flat['samples_per_micro_batch']:>12.1f}{flat['ms_per_micro_batch']:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
