"""The real understanding job's throughput per core, next to its transform floor measured in the same run.

    python -m bench.preprocess_job [--tars 8] [--large-per-tar 8] [--web-per-tar 40] [--repeat 2] [--gen-rows 2]
                                   [--vq-preset 1b] [--json out.json]

(Run with -m from the repository root: as `python bench/preprocess_job.py`, bench/preprocess.py would hide the
preprocess package.)

Corpora: webdataset tars of caption + photo, as img2dataset writes them. "web": the real photographs scikit-image
ships (<= 1 MP). "large": the same photos upscaled to ~12 MP and re-encoded as JPEG q95, a stand-in for camera
photos (no large photographs ship with a package here; see bench/preprocess.py). Photos repeat across records.

For each corpus:
- floor: one core, in this process, on the same bytes: decode (a large JPEG drafted to >= 3x the target, the
  scale that keeps 45 dB) + the understanding resize/pad + the storage encode. Best of --repeat passes.
- stages: one core, the job's own functions on the same tars, record by record: read (tar -> records),
  decode+transform, encode, tokenise, write (rows -> Arrow shard). Their sum is the work a row needs.
- job: `python -m preprocess understanding` in a subprocess (embedded Ray on all CPUs), run twice. Rates per
  core: over the whole command (Python and Ray start-up included), over the job's execution (from its first
  line to its last shard), and marginal: a third run on half the tars, and the extra rows of the full run over
  its extra execution time, in which fixed costs cancel (start-up, the tail of the last shard): the rate a long
  job settles at. "Ray and job overhead" is the job's core-seconds per row over its execution beyond the stages'
  sum; "fixed seconds" splits the start and the end of the faster full run.
- one tar alone: the job on the first tar only, so its one task takes every CPU (a thread each); its rate,
  and its shard must be the same bytes as in the full run.
- checks: both runs' shards byte-identical; every stored image decodes to exactly the floor's pixels.
The floor and the stages are timed in turns (--repeat passes, best of each), so load hits them alike.

Then the storage table: each stored-image option on the large corpus's transformed photos: encode ms, training-
time decode ms (model.images.decode_image, or reading the Arrow column back), bytes per image, and exactness.
Timing on a shared machine is noisy: compare columns of one run, and note the load printed with it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image
from transformers.models.janus.modeling_janus import JanusVQVAE

from bench.preprocess import photo_bytes
from model.chat_format import generation_prompt_ids, generation_sample, understanding_sample
from model.config import preset_config
from model.images import (
    IMAGE_SIZE,
    WEBP_LOSSLESS,
    decode_image,
    encode_image,
    generation_image,
    understanding_image,
)
from model.manifest import Manifest, read_shard, write_shard
from model.sample import samples_from_table, samples_to_table
from model.tokenizer import build_tokenizer
from model.vq import vq_encode_rows
from preprocess.records import ConvertConfig, cached_tokenizer, open_image, record_caption, understanding_turns
from preprocess.sources import list_shards, read_shard_records

REPO = Path(__file__).resolve().parents[1]
CAPTION = "A photograph of {}, taken on an ordinary day."


def write_tars(root: Path, photos: list[bytes], tars: int, per_tar: int) -> tuple[list[Path], dict[str, bytes]]:
    """`tars` webdataset tars of `per_tar` records each; and each record's key -> its photo's bytes."""
    root.mkdir(parents=True)
    paths, sources = [], {}
    for t in range(tars):
        path = root / f"{t:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_tar):
                key = f"{t:05d}{i:04d}"
                data = photos[(t * per_tar + i) % len(photos)]
                sources[key] = data
                members = {f"{key}.jpg": data, f"{key}.txt": CAPTION.format(key).encode()}
                for name, payload in members.items():
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(payload), 0
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(path)
    return paths, sources


def floor_image(data: bytes, fmt: str) -> bytes:
    """The least work a stored understanding image needs: drafted decode, resize + pad, storage encode."""
    return encode_image(understanding_image(decode_image(data)), fmt)


def best_seconds(fn, items: list, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for x in items:
            fn(x)
        best = min(best, time.perf_counter() - start)
    return best


def stage_seconds(tars: list[Path], cfg: ConvertConfig, out: Path) -> dict[str, float]:
    """One core, the job's functions one stage at a time over every record: seconds per row of each stage."""
    clock = dict.fromkeys(("read", "decode+transform", "encode", "tokenise", "write"), 0.0)
    tokenizer = cached_tokenizer(cfg.tokenizer)
    rows = 0
    for shard in list_shards([str(t) for t in tars], "auto", 10_000):
        start = time.perf_counter()
        records = read_shard_records(shard)
        clock["read"] += time.perf_counter() - start
        samples = []
        for record in records:
            start = time.perf_counter()
            image = understanding_image(open_image(record["images"][0], cfg))
            clock["decode+transform"] += time.perf_counter() - start
            start = time.perf_counter()
            stored = encode_image(image, cfg.image_format)
            clock["encode"] += time.perf_counter() - start
            start = time.perf_counter()
            system, turns = understanding_turns(record, 1, cfg)
            samples.append(understanding_sample(tokenizer, turns, [stored], system=system, key=record["key"],
                                                image_marker="<image>"))
            clock["tokenise"] += time.perf_counter() - start
        start = time.perf_counter()
        write_shard(samples_to_table(samples), out / shard.output_name())
        clock["write"] += time.perf_counter() - start
        rows += len(records)
    return {name: seconds / rows for name, seconds in clock.items()}


def generation_stage_seconds(tars: list[Path], cfg: ConvertConfig, vq: JanusVQVAE, batch_size: int, rows: int,
                             out: Path) -> dict[str, float]:
    """One core, the generation path's functions one stage at a time over the first `rows` records (VQ in padded
    batches of `batch_size`, as VQStage runs it): seconds per row of each stage."""
    clock = dict.fromkeys(("read", "decode+transform", "vq", "tokenise", "write"), 0.0)
    tokenizer = cached_tokenizer(cfg.tokenizer)
    records, read = [], 0
    for shard in list_shards([str(t) for t in tars], "auto", 10_000):
        start = time.perf_counter()
        records += read_shard_records(shard)
        clock["read"] += time.perf_counter() - start
        read = len(records)
        if read >= rows:
            break
    rows = min(rows, read)
    clock["read"] *= rows / read  # the share of the reading that the rows measured took
    pixels, captions = [], []
    for record in records[:rows]:
        start = time.perf_counter()
        image = generation_image(open_image(record["images"][0], cfg))
        pixels.append(np.asarray(image, dtype=np.uint8).tobytes())
        clock["decode+transform"] += time.perf_counter() - start
        start = time.perf_counter()
        captions.append(record_caption(record))
        generation_prompt_ids(tokenizer, captions[-1])  # the converter's length check
        clock["tokenise"] += time.perf_counter() - start
    samples = []
    for first in range(0, rows, batch_size):
        start = time.perf_counter()
        ids = vq_encode_rows(vq, pixels[first:first + batch_size], batch_size, IMAGE_SIZE)
        clock["vq"] += time.perf_counter() - start
        start = time.perf_counter()
        for i, row_ids in enumerate(ids):
            record = records[first + i]
            samples.append(generation_sample(tokenizer, captions[first + i], row_ids.tolist(), key=record["key"]))
        clock["tokenise"] += time.perf_counter() - start
    start = time.perf_counter()
    write_shard(samples_to_table(samples), out / "generation.arrow")
    clock["write"] += time.perf_counter() - start
    return {name: seconds / rows for name, seconds in clock.items()}


def run_job(tars: list[Path], out: Path, tokenizer: Path) -> dict:
    """`python -m preprocess understanding` on all CPUs; when each line came, and the manifest it wrote."""
    cmd = [sys.executable, "-m", "preprocess", "understanding", "--input", *map(str, tars), "--output", str(out),
           "--tokenizer", str(tokenizer), "--no-progress"]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    began, executing, shards = None, None, []  # the job's first line (inputs listed); Ray up, Ray Data starting
    for line in proc.stdout:
        now = time.perf_counter() - start
        if line.startswith("preprocess understanding:"):
            began = now
        elif "Starting execution of Dataset" in line:  # Ray Data's own log line
            executing = now
        elif line.startswith("[") and "rows written" in line:
            shards.append((now, int(line.split(": ")[1].split()[0])))
    if proc.wait(timeout=1800) != 0:
        raise RuntimeError(f"the job failed (exit {proc.returncode}): {' '.join(cmd)}")
    return {"wall": time.perf_counter() - start, "began": began, "executing": executing or began, "shards": shards,
            "manifest": Manifest.read(out)}


def execution_seconds(job: dict) -> float:
    """From the job's first line (Ray not yet started) to its last shard written."""
    return job["shards"][-1][0] - job["began"]


def job_rates(job: dict, rows: int, cpus: int, half: dict | None = None, half_rows: int = 0) -> dict:
    """Rows/s per core over the whole command and over the job's execution; with a run on half the tars, the
    marginal rate: the extra rows over the extra time, in which the fixed costs (start-up, the last shard's
    tail) cancel."""
    marginal = None
    if half is not None and execution_seconds(job) > execution_seconds(half):
        marginal = (rows - half_rows) / (execution_seconds(job) - execution_seconds(half)) / cpus
    return {"command": rows / job["wall"] / cpus, "execution": rows / execution_seconds(job) / cpus,
            "marginal": marginal}


def check_outputs(first: Manifest, second: Manifest, out: Path, sources: dict[str, bytes], fmt: str) -> int:
    """Both runs byte-identical, every stored image exactly the floor's pixels; the number of images checked."""
    if [s.sha256 for s in first.shards] != [s.sha256 for s in second.shards]:
        raise AssertionError("two runs of the same job wrote different shards")
    checked = 0
    for entry in first.shards:
        for sample in samples_from_table(read_shard(out / entry.file)):
            want = np.asarray(decode_image(floor_image(sources[sample.key], fmt)))
            if not np.array_equal(np.asarray(decode_image(sample.images[0])), want):
                raise AssertionError(f"{sample.key}: the stored image differs from the transform's")
            checked += 1
    return checked


def corpus_row(name: str, photos: list[bytes], per_tar: int, args: argparse.Namespace, work: Path,
               tokenizer: Path) -> dict:
    cpus = os.cpu_count() or 1
    cfg = ConvertConfig(task="understanding", tokenizer=str(tokenizer))
    tars, sources = write_tars(work / name / "in", photos, args.tars, per_tar)
    rows = len(sources)
    load_before = os.getloadavg()[0]
    floor_s, stages = float("inf"), {}
    for r in range(args.repeat):  # interleaved, best of each: load from other jobs hits both alike
        floor_s = min(floor_s, best_seconds(lambda d: floor_image(d, cfg.image_format), photos, 1) / len(photos))
        (work / name / f"stages{r}").mkdir()
        for stage, seconds in stage_seconds(tars, cfg, work / name / f"stages{r}").items():
            stages[stage] = min(stages.get(stage, float("inf")), seconds)
    gen_stages = {}
    if args.gen_rows:
        torch.manual_seed(0)
        vq = JanusVQVAE(preset_config(args.vq_preset).vq_config).eval()
        (work / name / "gen").mkdir()
        gen_cfg = ConvertConfig(task="generation", tokenizer=str(tokenizer))
        gen_stages = generation_stage_seconds(tars, gen_cfg, vq, args.vq_batch, args.gen_rows, work / name / "gen")
    first = run_job(tars, work / name / "out1", tokenizer)
    second = run_job(tars, work / name / "out2", tokenizer)
    checked = check_outputs(first["manifest"], second["manifest"], work / name / "out1", sources, cfg.image_format)
    half_tars = tars[:max(1, len(tars) // 2)]
    half = run_job(half_tars, work / name / "half", tokenizer)
    half_rows = half["manifest"].rows_in
    rates = [job_rates(job, rows, cpus, half, half_rows) for job in (first, second)]
    best = {k: max(r[k] or 0 for r in rates) for k in rates[0]}
    # One tar alone: its task takes every CPU (one thread each); its shard must be the same bytes. With two tars
    # the half run was that job already.
    alone = half if half_tars == tars[:1] else run_job(tars[:1], work / name / "alone", tokenizer)
    if alone["manifest"].shards[0].sha256 != first["manifest"].shards[0].sha256:
        raise AssertionError("one tar alone (spread over the CPUs) wrote a different shard")
    floor = 1 / floor_s
    per_row_job = 1 / best["execution"]  # core-seconds per row
    # Fixed costs, seconds of the faster run: Python imports + tokenizer, Ray start, Ray Data to its first shard
    # (worker processes start and import the job's modules, then a first wave of shards is converted).
    fast = min((first, second), key=execution_seconds)
    fixed = {"before_ray": fast["began"], "ray_start": fast["executing"] - fast["began"],
             "to_first_shard": fast["shards"][0][0] - fast["executing"],
             "after_last_shard": fast["wall"] - fast["shards"][-1][0]}
    return {"corpus": name, "rows": rows, "tars": args.tars, "cpus": cpus, "floor_rows_per_s_per_core": floor,
            "job_rows_per_s_per_core": best, "job_vs_floor": {k: v / floor for k, v in best.items()},
            "one_tar_rows_per_s_per_core": job_rates(alone, per_tar, cpus)["execution"],
            "half_run_execution_s": execution_seconds(half),
            "stage_ms_per_row": {k: v * 1e3 for k, v in stages.items()},
            "overhead_ms_per_row": (per_row_job - sum(stages.values())) * 1e3, "fixed_s": fixed,
            "marginal_overhead_ms_per_row": (1 / best["marginal"] - sum(stages.values())) * 1e3
            if best["marginal"] else None,
            "generation_stage_ms_per_row": {k: v * 1e3 for k, v in gen_stages.items()},
            "images_checked": checked, "load_1min": [load_before, os.getloadavg()[0]]}


# --- the stored-image options ---

def saved(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def arrow_raw(images: list[Image.Image], codec: str) -> bytes:
    """A one-column Arrow IPC file of raw 384x384x3 pixels, its buffers compressed with `codec`."""
    table = pa.table({"pixels": pa.array([im.tobytes() for im in images], pa.binary())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=codec)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def arrow_pixels(data: bytes) -> list[np.ndarray]:
    column = pa.ipc.open_file(pa.BufferReader(data)).read_all().column("pixels")
    return [np.frombuffer(v.as_py(), np.uint8).reshape(384, 384, 3) for v in column]


def storage_options() -> dict[str, dict]:
    """Option name -> Pillow save arguments (the lossless ones, each WebP method at Pillow's default effort and
    at most effort 100 where that is cheap; each PNG level); JPEG q98 for scale."""
    options = {f"webp lossless m{m}": {"format": "WEBP", "lossless": True, "method": m} for m in range(7)}
    options |= {f"webp lossless m{m} q100": {"format": "WEBP", "lossless": True, "method": m, "quality": 100}
                for m in (0, 1)}
    options |= {f"png level {c}": {"format": "PNG", "compress_level": c} for c in range(10)}
    options["jpeg q98 4:4:4 (lossy)"] = {"format": "JPEG", "quality": 98, "subsampling": 0}
    default = {"format": "WEBP", **WEBP_LOSSLESS}  # what model.images.encode_image writes: marked in the table
    return {f"{name} (default)" if spec == default else name: spec for name, spec in options.items()}


def storage_table(images: list[Image.Image], repeat: int) -> list[dict]:
    """Encode ms, decode ms, bytes per image and exactness of each option, on the same transformed photos."""
    want = [np.asarray(im) for im in images]
    rows = []
    for name, options in storage_options().items():
        options = dict(options)
        fmt = options.pop("format")
        blobs = [saved(im, fmt, **options) for im in images]
        encode = best_seconds(lambda im, fmt=fmt, options=options: saved(im, fmt, **options), images, repeat)
        decode = best_seconds(decode_image, blobs, repeat)
        exact = all(np.array_equal(np.asarray(decode_image(b)), w) for b, w in zip(blobs, want, strict=True))
        rows.append({"option": name, "encode_ms": encode / len(images) * 1e3, "decode_ms": decode / len(images) * 1e3,
                     "bytes": sum(map(len, blobs)) / len(images), "exact": exact})
    for codec in ("zstd", "lz4"):
        blob = arrow_raw(images, codec)
        encode = best_seconds(lambda _, codec=codec: arrow_raw(images, codec), [None], repeat)
        decode = best_seconds(arrow_pixels, [blob], repeat)
        exact = all(np.array_equal(a, w) for a, w in zip(arrow_pixels(blob), want, strict=True))
        rows.append({"option": f"raw pixels, Arrow IPC {codec}", "encode_ms": encode / len(images) * 1e3,
                     "decode_ms": decode / len(images) * 1e3, "bytes": len(blob) / len(images), "exact": exact})
    return rows


def fastest_within(rows: list[dict], reference: str, slack: float = 1.25) -> str:
    """The exact option that encodes fastest with bytes within `slack` of `reference`'s."""
    limit = slack * next(r["bytes"] for r in rows if r["option"] == reference)
    return min((r for r in rows if r["exact"] and r["bytes"] <= limit), key=lambda r: r["encode_ms"])["option"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tars", type=int, default=8, help="tars per corpus (several per CPU)")
    parser.add_argument("--large-per-tar", type=int, default=8)
    parser.add_argument("--web-per-tar", type=int, default=40)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--gen-rows", type=int, default=2,
                        help="records of each corpus for the generation (VQ) split, one core (0: none)")
    parser.add_argument("--vq-batch", type=int, default=2, help="the generation split's VQ batch")
    parser.add_argument("--vq-preset", default="1b", help="the VQ's config (1b and 7b: the real VQ-16; tiny)")
    parser.add_argument("--corpus", choices=("large", "web", "both", "none"), default="both",
                        help="which corpora to run the job on (none: only the storage table)")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    photos = photo_bytes()
    large, web = photos["large (~12 MP JPEG)"], photos["web (<= 1 MP)"]
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} (1 min) at start", flush=True)
    results: dict = {"jobs": [], "storage": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tokenizer = work / "tokenizer"
        build_tokenizer(tokenizer)
        for name, items, per_tar in (("large", large, args.large_per_tar), ("web", web, args.web_per_tar)):
            if args.corpus not in (name, "both"):
                continue
            row = corpus_row(name, items, per_tar, args, work, tokenizer)
            results["jobs"].append(row)
            print_job(row)
    images = [understanding_image(decode_image(d)) for d in large]
    results["storage"] = storage_table(images, args.repeat)
    print_storage(results["storage"])
    print(f"load {os.getloadavg()[0]:.2f} (1 min) at end", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def print_job(row: dict) -> None:
    rates, ratio = row["job_rows_per_s_per_core"], row["job_vs_floor"]
    marginal = f"{rates['marginal']:.2f} ({ratio['marginal']:.0%})" if rates["marginal"] else "-"
    print(f"\n{row['corpus']}: {row['rows']} rows in {row['tars']} tars on {row['cpus']} CPUs, load "
          f"{row['load_1min'][0]:.2f} -> {row['load_1min'][1]:.2f}; rows/s per core (share of the floor):\n"
          f"  floor {row['floor_rows_per_s_per_core']:.2f}  job: marginal {marginal}, execution "
          f"{rates['execution']:.2f} ({ratio['execution']:.0%}), whole command {rates['command']:.2f} "
          f"({ratio['command']:.0%})")
    print(f"  one tar alone, spread over the CPUs: {row['one_tar_rows_per_s_per_core']:.2f} over its execution, "
          "its shard identical")
    stages = "  ".join(f"{k} {v:.1f}" for k, v in row["stage_ms_per_row"].items())
    fixed = "  ".join(f"{k} {v:.1f}" for k, v in row["fixed_s"].items())
    extra = row["marginal_overhead_ms_per_row"]
    print(f"  ms per row, one core: {stages}  | Ray and job overhead {row['overhead_ms_per_row']:.1f} over the "
          f"execution, {'-' if extra is None else f'{extra:.1f}'} at the marginal rate\n  fixed seconds: {fixed}\n"
          f"  {row['images_checked']} stored images = the transform's pixels; reruns byte-identical", flush=True)
    if row["generation_stage_ms_per_row"]:
        gen = "  ".join(f"{k} {v:.1f}" for k, v in row["generation_stage_ms_per_row"].items())
        print(f"  generation (VQ) path, ms per row, one core: {gen}", flush=True)


def print_storage(rows: list[dict]) -> None:
    print(f"\n{'stored image (384x384 photo)':<34}{'encode ms':>10}{'decode ms':>10}{'KB':>8}  exact")
    for r in rows:
        print(f"{r['option']:<34}{r['encode_ms']:>10.1f}{r['decode_ms']:>10.2f}{r['bytes'] / 1e3:>8.1f}  "
              f"{'yes' if r['exact'] else 'no'}")
    print(f"fastest exact option within 25% of the bytes of Pillow's default lossless WebP (m4, the default "
          f"before): {fastest_within(rows, 'webp lossless m4')}", flush=True)


if __name__ == "__main__":
    main()
