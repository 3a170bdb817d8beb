"""Data-path throughput: packed tokens/s of DataPipeline (read, mix, pack, decode images, build tensors).

    python bench/loader.py --tokenizer DIR --und DIR --text DIR --gen DIR [--batches 50] [--workers 2]

Reports wall-clock tokens/s and tokens per CPU-second (process CPU time, all threads), the figure to
hold against a GPU's appetite: one 1B step on an A100 eats ~30K tokens/s per GPU.
"""

from __future__ import annotations

import argparse
import json
import time

from model.stages import STAGES
from model.tokenizer import SpecialTokens, load_tokenizer
from pipeline.config import DataConfig
from pipeline.data import DataPipeline


def loader_throughput(special: SpecialTokens, sources: dict[str, str], ratio: tuple[int, int, int], batches: int,
                      workers: int, seq_len: int = 4096, rows: int = 2) -> dict:
    manifests = [sources[t] for t, r in zip(("und", "text", "gen"), ratio, strict=True) if r > 0]
    config = DataConfig(data=manifests, ratio=list(ratio), seq_len=seq_len, rows_per_micro_batch=rows,
                        num_workers=workers, prefetch=2 * workers)
    pipe = iter(DataPipeline(config, special))
    next(pipe)  # warm-up: opens and verifies the shards
    wall, cpu = time.perf_counter(), time.process_time()
    tokens = images = 0
    for _ in range(batches):
        batch = next(pipe)
        tokens += int((batch.task >= 0).sum())
        images += batch.pixel_values.shape[0]
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"tokens_per_s": tokens / wall, "tokens_per_cpu_s": tokens / cpu, "images_per_s": images / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("tokenizer", "und", "text", "gen"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    special = SpecialTokens.from_tokenizer(load_tokenizer(args.tokenizer))
    sources = {"und": args.und, "text": args.text, "gen": args.gen}
    print(f"{'stage':<7}{'tokens/s':>12}{'tokens/CPU-s':>14}{'und images/s':>14}")
    results = {}
    for stage, table in STAGES.items():
        r = results[f"stage{stage}"] = loader_throughput(special, sources, table.ratio, args.batches, args.workers)
        print(f"{stage:<7}{r['tokens_per_s']:>12,.0f}{r['tokens_per_cpu_s']:>14,.0f}{r['images_per_s']:>14.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
