"""Packing efficiency per stage mixture: real tokens / row tokens, next to pad-to-longest batching.

    python bench/packing.py --und DIR --text DIR --gen DIR [--rows 200] [--seq-len 4096] [--json out.json]

Each DIR is a preprocess output directory (manifest.json + shards). Pad-to-longest batches the same
samples, `rows` at a time, padded to the longest sample of the batch: what packing saves.
"""

from __future__ import annotations

import argparse
import json
import time

from model.batch import sample_length
from model.stages import STAGES
from pipeline.config import DataConfig
from pipeline.data import DataPipeline


def packing_efficiency(sources: dict[str, str], ratio: tuple[int, int, int], rows: int, seq_len: int,
                       buffer_size: int = 64) -> dict:
    manifests = [sources[t] for t, r in zip(("und", "text", "gen"), ratio, strict=True) if r > 0]
    pipe = DataPipeline(DataConfig(data=manifests, ratio=list(ratio), seq_len=seq_len, buffer_size=buffer_size,
                                   guidance_dropout=0.0), special=None)
    start = time.perf_counter()
    planned = [pipe.plan_micro_batch()[0] for _ in range(rows)]
    seconds = time.perf_counter() - start
    lengths = [[sample_length(s) for s in row] for row in planned]
    real = sum(map(sum, lengths))
    flat = [n for row in lengths for n in row]
    per_batch = max(1, len(flat) // rows)  # as many samples per padded batch as a packed row holds
    padded = sum(max(flat[i:i + per_batch]) * len(flat[i:i + per_batch]) for i in range(0, len(flat), per_batch))
    return {"packed": real / (rows * seq_len), "pad_to_longest": real / padded,
            "samples_per_row": len(flat) / rows, "ms_per_row": 1e3 * seconds / rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--und", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--gen", required=True)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--json")
    args = parser.parse_args()
    sources = {"und": args.und, "text": args.text, "gen": args.gen}
    results = {}
    print(f"{'stage':<8}{'ratio':<10}{'packed':>9}{'pad-to-longest':>16}{'samples/row':>13}{'ms/row':>9}")
    for stage, table in STAGES.items():
        r = packing_efficiency(sources, table.ratio, args.rows, args.seq_len)
        results[f"stage{stage}"] = r
        ratio = ":".join(map(str, table.ratio))
        print(f"{stage:<8}{ratio:<10}{r['packed']:>9.2%}{r['pad_to_longest']:>16.2%}"
              f"{r['samples_per_row']:>13.1f}{r['ms_per_row']:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
