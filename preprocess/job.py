"""The Ray Data job: input shards -> read -> decode/transform/tokenise -> (VQ actors) -> Arrow shards + manifest.

    from_items(pending shards) -> map_batches(shard_rows)            tasks, one per input shard: read it, then
                                                                     decode/convert; bad input = skip row; with
                                                                     fewer shards than CPUs, a task takes several
                                                                     CPUs and converts on as many threads
                               -> map_batches(VQStage)               generation only: a batched actor pool
                               -> iter_batches on the driver         rows regrouped by input shard; a shard is
                                                                     written when all its rows have arrived

Writing on the driver keeps one writer per output file (atomic rename, no appends on rerun) and lets it
know when a shard is complete. A finished shard gets a progress record (`DIR/.progress/NAME.json`: its
accounting, sha256 and the settings hash) *after* its file is renamed into place, so a rerun keeps exactly
the shards that have both, redoes the rest and deletes temporary files a killed run left behind.

Exit codes (preprocess/cli.py): 0 done; 2 a usage or configuration mistake, found before any work; 3 the job
ran but wrote no row, or skipped more than `--max-skip-fraction` of its rows (the manifest is still written,
so the counts per reason can be read; a rerun with a higher fraction keeps the shards written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import signal
import sys
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import ray._private.ray_constants as ray_constants
import torch
from ray._raylet import AuthenticationTokenLoader, Config

from model.chat_format import generation_sample
from model.images import IMAGE_SIZE
from model.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    atomic_write_bytes,
    file_sha256,
    prompt_digests,
    prompt_sharing,
    read_shard,
    tokenizer_fingerprint,
    weights_fingerprint,
    write_shard,
)
from model.sample import GENERATION, SAMPLE_SCHEMA, Sample, samples_to_table
from preprocess.records import (
    EMPTY_SHARD,
    FILE_FAILED,
    INPUT_LOST,
    OUT_SCHEMA,
    ConvertConfig,
    cached_tokenizer,
    convert_record,
)
from preprocess.sources import InputShard, list_shards, read_shard_records, redact

log = logging.getLogger("preprocess")
PROGRESS_DIR = ".progress"
# Written into DIR/.progress before anything else: the task and settings hash of the job this output belongs to.
# Only an output holding it (or a manifest or progress records of the same settings) is resumed or cleaned up.
OWNER_FILE = "job.json"
# A shard task is run this many times in all (--task-tries) before its input is listed in files_failed and the job
# goes on: Ray Data's default retries a task whose worker died without limit, and an input that gets its worker
# killed for memory (or crashes a library) kills every retry too.
DEFAULT_TASK_TRIES = 3
# Test hook: SIGKILL this process while the n-th shard of the run is half written under its temporary name.
KILL_ENV = "JANUS_PREPROCESS_TEST_KILL_AT_SHARD"
# Test hook: the task of an input shard whose source holds this string ends its worker on every try, as a worker
# killed for memory does (used by the test that the job lists such an input as failed and goes on).
DIE_ENV = "JANUS_PREPROCESS_TEST_DIE_ON_SOURCE"
EXIT_USAGE = 2
EXIT_REJECTED = 3
DEFAULT_MAX_SKIP_FRACTION = 0.5
# Ray's switch for a single-machine Ray (meant for laptops): every Ray server then listens on 127.0.0.1 only
# and no other node can join. Each process Ray starts reads it from the environment when it imports Ray.
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


class UsageError(ValueError):
    """A mistake in the command line or its files, found before any work: exit code 2, one line."""


class JobRejected(RuntimeError):
    """The job ran, but its output is not fit to train on (no row, or too many skipped): exit code 3."""


VQ_BATCH_SIZE = 16  # images per VQ forward unless --vq-batch-size says otherwise


@dataclass
class JobConfig:
    inputs: list[str]
    output: str
    convert: ConvertConfig
    input_format: str = "auto"
    shard_size: int = 10_000
    image_root: str = ""
    class_names: str = ""
    vq: str = ""
    vq_dtype: str = "float32"
    vq_batch_size: int = VQ_BATCH_SIZE
    vq_actors: int = 0  # 0: --vq-actors-per-gpu on each GPU, or a quarter of the CPUs
    vq_actors_per_gpu: int = 1
    vq_channels_last: bool = False
    cpus: int | None = None  # embedded Ray only
    gpus: int | None = None
    address: str = ""
    convert_batch_size: int = 16
    progress: bool = True  # Ray Data's progress bars, on a terminal only (without one they log "0/?" lines)
    progress_every_s: float = 60.0  # seconds between progress lines (counts, rate, ETA); 0: after every batch
    max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION  # not in the settings hash: it decides no bytes
    task_tries: int = DEFAULT_TASK_TRIES  # nor this: it decides whether an input is given up on, like the above


@dataclass
class ShardResult:
    """What a finished shard contributed; stored beside it so a rerun can keep it."""

    file: str
    source: str
    rows_in: int
    rows_written: int
    sha256: str
    settings_hash: str
    skipped: dict[str, int] = field(default_factory=dict)
    bytes: int | None = None  # None in progress records written before sizes were recorded
    files_failed: list[dict] = field(default_factory=list)  # {source, reason}: the input file broke or was unreadable


def in_ray_job() -> bool:
    """True under `ray job submit`: the job supervisor hands the driver its job config in this variable."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ


def check_output_path(output: str) -> Path:
    path = Path(output)
    if not path.is_absolute() and in_ray_job():
        # A job runs in a temporary copy of --working-dir: a relative output would vanish with it.
        raise UsageError(f"--output {output!r} is relative; under `ray job submit` the job runs in a copy of the "
                         "working directory that is deleted afterwards. Pass an absolute path on shared storage.")
    return path.resolve()


def job_settings(cfg: JobConfig, shards: list[InputShard], tok_fp: str, vq_fp: str | None) -> dict:
    """What decides the bytes of the shards (not CPUs, address or output): hashed to guard resumes."""
    convert = asdict(cfg.convert)
    convert["instructions"] = list(convert["instructions"])
    # Other convolution kernels may flip a near-tie between two codes: a channels-last VQ, or another batch shape
    # (every forward is padded to it). Recorded only when not the default, so outputs written before keep their hash.
    vq_kernels = {}
    if cfg.convert.task == GENERATION and cfg.vq_channels_last:
        vq_kernels["vq_channels_last"] = True
    if cfg.convert.task == GENERATION and cfg.vq_batch_size != VQ_BATCH_SIZE:
        vq_kernels["vq_batch_size"] = cfg.vq_batch_size
    return {
        "input_format": cfg.input_format,
        "inputs": [redact(i) for i in cfg.inputs],
        "input_shards": [s.source for s in shards],
        "shard_size": cfg.shard_size,
        "image_root": redact(cfg.image_root),
        "class_names": cfg.class_names,
        "convert": convert,
        "tokenizer_fingerprint": tok_fp,
        "vq_fingerprint": vq_fp,
        "vq_dtype": cfg.vq_dtype if cfg.convert.task == GENERATION else None,
        **vq_kernels,
    }


def settings_hash(settings: dict) -> str:
    stable = {k: v for k, v in settings.items() if k not in ("inputs", "input_shards")}  # inputs may grow
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def output_owner(out: Path) -> tuple[str, set[str]] | None:
    """Who made the output directory `out` (symlinks resolved): (task, settings hashes) from its owner file, else its
    manifest, else its progress records; None when it holds nothing (or does not exist). A UsageError when it is
    not a preprocess output: a file, or a folder of other things."""
    if out.exists() and not out.is_dir():  # found now, not when the first shard is written
        raise UsageError(f"--output {out}: not a directory; name a directory to create or one this command made")
    if not out.exists() or not [p for p in out.iterdir() if p.name != PROGRESS_DIR or any(p.iterdir())]:
        return None  # new, empty, or holding only the empty folder a run makes first
    owner, manifest = out / PROGRESS_DIR / OWNER_FILE, out / MANIFEST_NAME
    try:
        if owner.is_file():
            data = json.loads(owner.read_text())
            return data["task"], {data["settings_hash"]}
        if manifest.is_file():
            found = Manifest.read(manifest)
            return found.task, {settings_hash(found.settings)}
        records = [json.loads(p.read_text()) for p in (out / PROGRESS_DIR).glob("*.json")]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"--output {out}: its manifest or owner file is unreadable ({error}); choose another "
                         "directory") from None
    if records:
        return "", {r.get("settings_hash") for r in records}
    raise UsageError(f"--output {out}: not empty and not a preprocess output; choose an empty or new directory")


def check_output_owner(out: Path, task: str, shash: str) -> None:
    """An output directory made by another task or other settings is refused, never adopted: resuming into it
    would replace its manifest and orphan its shards."""
    owner = output_owner(out)
    if owner is None:
        return
    found_task, hashes = owner
    if (found_task and found_task != task) or hashes != {shash}:
        made_by = f"a {found_task} job" if found_task and found_task != task else "a job with other settings"
        raise UsageError(f"--output {out} holds the output of {made_by}; choose another directory (a resume needs "
                         "the same task and settings)")


def claim_output(out: Path, task: str, shash: str) -> None:
    (out / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / PROGRESS_DIR / OWNER_FILE,
                       (json.dumps({"task": task, "settings_hash": shash}, sort_keys=True) + "\n").encode())


def clean_temporaries(out: Path) -> list[str]:
    """Temporary shards a killed run left (`.NAME.tmp-PID`): never complete, never read."""
    removed = []
    for tmp in list(out.glob(".*.tmp-*")) + list((out / PROGRESS_DIR).glob(".*.tmp-*")):
        tmp.unlink()
        removed.append(tmp.name)
    return removed


def finished_shards(out: Path, shards: list[InputShard], shash: str) -> dict[int, ShardResult]:
    """Shards of an earlier run to keep: progress record present, file present with the recorded sha256."""
    done = {}
    for shard in shards:
        record = out / PROGRESS_DIR / (shard.output_name() + ".json")
        if not record.is_file():
            continue
        result = ShardResult(**json.loads(record.read_text()))
        if result.settings_hash != shash:
            raise UsageError(f"{out} holds shards made with different settings ({record.name}); use a new --output "
                             "or delete the old one")
        if (out / result.file).is_file() and file_sha256(out / result.file) == result.sha256:
            done[shard.index] = result
        else:
            log.warning("redoing %s: its file is missing or changed since it was recorded", result.file)
    return done


def shard_rows(batch: pa.Table, cfg: ConvertConfig, chunk: int, threads: int = 1) -> Iterator[pa.Table]:
    """`map_batches` body for one shard descriptor: that input shard's records converted in record order, on
    `threads` threads (Pillow releases the GIL while it decodes, resizes and encodes), `chunk` rows a table.
    Decoding happens here, not in Ray's readers, so that one bad file is one skip.

    One task per input shard, by construction: as two fused `map_batches` steps Ray Data bundled as many
    descriptors into a task as the convert step's batch size (16), so a small job ran in one task, and a
    lost worker cost 16 shards."""
    for desc in batch.to_pylist():
        if os.environ.get(DIE_ENV) and os.environ[DIE_ENV] in desc["source"]:
            os._exit(1)
        rows: list[dict] = []
        # The reader's dicts go straight to the converter: a round trip through an Arrow table copied every image.
        for converted in ordered_map(partial(convert_record, cfg=cfg), read_shard_records(InputShard(**desc)),
                                     threads):
            rows += converted
            if len(rows) >= chunk:
                yield pa.Table.from_pylist(rows, schema=OUT_SCHEMA)
                rows = []
        if rows:
            yield pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


def ordered_map(fn: Callable, items: Iterable, threads: int) -> Iterator:
    """`map(fn, items)` on `threads` threads, in order, with at most 2 x `threads` results held ahead."""
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads) as pool:
        ahead: deque = deque()
        for item in items:
            ahead.append(pool.submit(fn, item))
            if len(ahead) >= 2 * threads:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def task_resources(node_cpus: list[int], pending: int, reserved: float = 0) -> tuple[float, int]:
    """(CPUs to ask for, threads) per shard task: with fewer input shards than CPUs, each takes several, never more than
    one node has (a task runs on one node: asking more would never schedule), leaving `reserved` CPUs (the VQ actors')
    free. Where less than a whole CPU is left (a 1-CPU machine, half of it the VQ actor's) the task asks for that
    fraction: asking for a whole one would never schedule, and the job would wait forever."""
    biggest = max(node_cpus, default=1)
    free = biggest - min(reserved, biggest / 2)  # vq_resources keeps the actors to half the CPUs
    threads = max(1, min(int((sum(node_cpus) - reserved) // max(pending, 1)), int(free)))
    return min(float(threads), free), threads


class VQStage:
    """Actor: generation pixels -> cosine VQ ids -> the finished generation sample, batched.

    Batches are padded to a fixed size so every forward has the same shape: the same image then gets
    the same ids whatever it was batched with, and reruns are byte-identical."""

    def __init__(self, vq_path: str, dtype: str, batch_size: int, tokenizer: str, threads: int,
                 channels_last: bool = False) -> None:
        # The VQ's modules (transformers' modelling code: ~1.2 s of CPU to import, 40% of what a worker imported)
        # are imported where the VQ is used, so the workers of understanding and text jobs never load them.
        from model.config import DTYPES
        from model.vq import load_vq

        torch.set_num_threads(max(1, threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.vq = load_vq(vq_path).to(device=device, dtype=DTYPES[dtype])
        if channels_last:
            self.vq = self.vq.to(memory_format=torch.channels_last)
        self.batch_size = batch_size
        self.tokenizer = tokenizer

    def __call__(self, batch: pa.Table) -> pa.Table:
        from model.vq import vq_encode_rows

        rows = batch.to_pylist()
        todo = [r for r in rows if r["gen_pixels"] is not None]
        tokenizer = cached_tokenizer(self.tokenizer)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            ids = vq_encode_rows(self.vq, [r["gen_pixels"] for r in chunk], self.batch_size, IMAGE_SIZE)
            for row, row_ids in zip(chunk, ids, strict=True):
                row.update(generation_sample(tokenizer, row["caption"], row_ids.tolist(), key=row["key"]).to_row())
                row["gen_pixels"] = None
        return pa.Table.from_pylist(rows, schema=OUT_SCHEMA)


def vq_resources(cfg: JobConfig, cpus: int, gpus: int) -> dict:
    """GPUs: --vq-actors-per-gpu actors on each (bench/vq.py: how many keep a GPU busy while each also does its host
    work). CPUs: a quarter of them in actors. Either way the actors together hold at most half the CPUs, so the
    reader/decoder tasks keep running (an actor pool that takes every CPU starves the readers and the job waits
    forever); with few CPUs an actor asks for a fraction of one."""
    if gpus:
        actors, threads = cfg.vq_actors or gpus * cfg.vq_actors_per_gpu, 2
    else:
        actors = cfg.vq_actors or max(1, cpus // 4)
        threads = max(1, cpus // (2 * actors))
    resources = {"concurrency": actors, "num_cpus": min(1.0, cpus / 2 / actors), "threads": threads}
    return {**resources, "num_gpus": 1 / cfg.vq_actors_per_gpu} if gpus else resources


def build_dataset(cfg: JobConfig, pending: list[InputShard]) -> ray.data.Dataset:
    ds = ray.data.from_items([s.to_dict() for s in pending], override_num_blocks=len(pending))
    # A task whose worker dies is run again by Ray Data itself, --task-tries times in all (its default: without
    # limit); after that its block is dropped (DataContext.max_errored_blocks, set in run) and the driver lists
    # the shard as failed. Its actor pools restart actors. A run-again task does not deliver rows twice (its
    # generator's outputs are numbered), and a shard is written only when it holds exactly the rows its
    # records announced.
    cluster = ray.cluster_resources()
    res = (vq_resources(cfg, int(cluster.get("CPU", 1)), int(cluster.get("GPU", 0)))
           if cfg.convert.task == GENERATION else None)
    # The VQ actors' CPUs stay free: a shard task holding them would hold back the actors that consume its rows.
    node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
    cpus, threads = task_resources(node_cpus, len(pending), res["concurrency"] * res["num_cpus"] if res else 0)
    with warnings.catch_warnings():  # Ray 2.60 deprecates Ray's task options here and names no replacement yet
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(shard_rows, batch_format="pyarrow", batch_size=1, num_cpus=cpus,
                            fn_kwargs={"cfg": cfg.convert, "chunk": cfg.convert_batch_size, "threads": threads},
                            max_retries=cfg.task_tries - 1)
    if res:
        ds = ds.map_batches(VQStage, batch_format="pyarrow", batch_size=cfg.vq_batch_size,
                            concurrency=res["concurrency"], num_cpus=res["num_cpus"], num_gpus=res.get("num_gpus"),
                            fn_constructor_kwargs={"vq_path": cfg.vq, "dtype": cfg.vq_dtype,
                                                   "batch_size": cfg.vq_batch_size,
                                                   "channels_last": cfg.vq_channels_last,
                                                   "tokenizer": cfg.convert.tokenizer, "threads": res["threads"]})
    return ds


class ShardAssembler:
    """Regroups streamed rows by input shard and writes each shard once all of its rows have arrived."""

    def __init__(self, out: Path, pending: list[InputShard], shash: str, n_total: int, n_done: int,
                 task_tries: int = DEFAULT_TASK_TRIES, progress_every_s: float = 60.0) -> None:
        self.out, self.shash, self.task_tries = out, shash, task_tries
        self.shards = {s.index: s for s in pending}
        self.rows: dict[int, list[dict]] = {s.index: [] for s in pending}
        self.parts: dict[int, dict[int, int]] = {s.index: {} for s in pending}
        self.results: dict[int, ShardResult] = {}
        self.n_total, self.n_done = n_total, n_done
        self.kill_at = int(os.environ.get(KILL_ENV, "0"))
        self.skip_examples: Counter = Counter()
        self.start = time.time()
        self.progress_every_s, self.last_progress = progress_every_s, self.start

    def progress_line(self, now: float) -> str:
        """Rows read so far (written and skipped: of the finished shards), the rate and an ETA from the shards
        this run has finished: the one line a log without a terminal gets."""
        finished = list(self.results.values())
        read = sum(r.rows_in for r in finished) + sum(len(rows) for rows in self.rows.values())
        written = sum(r.rows_written for r in finished)
        skipped = sum(sum(r.skipped.values()) for r in finished)
        elapsed = max(now - self.start, 1e-9)
        left = len(self.shards) - len(finished)
        eta = f"{elapsed / len(finished) * left / 60:.1f} min" if finished else "unknown (no shard finished yet)"
        return (f"progress: {self.n_done}/{self.n_total} shards, {read:,} rows read ({written:,} written, "
                f"{skipped:,} skipped in finished shards), {read / elapsed:.1f} rows/s, ETA {eta}")

    def report_progress(self) -> None:
        now = time.time()
        if now - self.last_progress >= self.progress_every_s:
            self.last_progress = now
            print(self.progress_line(now), flush=True)

    def add(self, batch: pa.Table) -> None:
        touched = set()
        for row in batch.to_pylist():
            shard = row["shard"]
            if row["skip"] == EMPTY_SHARD:
                self.parts[shard][-1] = 0
            else:
                self.rows[shard].append(row)
                self.parts[shard][row["index"]] = row["parts"]
            touched.add(shard)
        for shard in touched:
            if self.complete(shard):
                self.finish(shard)

    def complete(self, shard: int) -> bool:
        rows, parts = self.rows[shard], self.parts[shard]
        if -1 in parts:
            return True
        total = rows[0]["total"] if rows else 0
        return len(parts) == total and len(rows) == sum(parts.values())

    def finish(self, index: int) -> None:
        shard = self.shards[index]
        rows = sorted(self.rows.pop(index), key=lambda r: (r["index"], r["part"]))
        # A file that failed is not a row: it is listed, and its records read before the fault are counted.
        failed = [{"source": shard.source, "reason": r["detail"]} for r in rows if r["skip"] == FILE_FAILED]
        rows = [r for r in rows if r["skip"] != FILE_FAILED]
        skipped = Counter(r["skip"] for r in rows if r["skip"])
        for r in rows:
            # A few examples per reason, then only counts; lost records are said once, by the warning below.
            if r["skip"] not in (None, INPUT_LOST) and self.skip_examples[r["skip"]] < 5:
                self.skip_examples[r["skip"]] += 1
                log.info("skip %s in %s: %s", r["key"], shard.source, r["detail"])
        kept = [r for r in rows if not r["skip"]]
        if any(r["gen_pixels"] is not None for r in kept):
            raise RuntimeError(f"{shard.source}: generation rows reached the writer without VQ ids")
        table = samples_to_table([Sample.from_row({k: r[k] for k in SAMPLE_SCHEMA.names}) for r in kept])
        path = self.out / shard.output_name()
        self.maybe_die_for_test(table, path)
        entry = write_shard(table, path)
        result = ShardResult(file=entry.file, source=shard.source, rows_in=len(rows), rows_written=entry.rows,
                             sha256=entry.sha256, bytes=entry.bytes, settings_hash=self.shash,
                             skipped=dict(sorted(skipped.items())), files_failed=failed)
        record = self.out / PROGRESS_DIR / (entry.file + ".json")
        for problem in failed:
            log.warning("input file failed: %s: %s", problem["source"], problem["reason"])
        if not failed:  # no progress record: a rerun tries a failed file again (it may be fixed, or was a hiccup)
            atomic_write_bytes(record, (json.dumps(asdict(result), indent=2, sort_keys=True) + "\n").encode())
        self.results[index] = result
        self.n_done += 1
        rate = sum(r.rows_in for r in self.results.values()) / max(time.time() - self.start, 1e-9)
        print(f"[{self.n_done}/{self.n_total} shards] {entry.file}: {entry.rows} rows written, "
              f"{sum(skipped.values())} skipped  ({rate:.1f} rows/s)", flush=True)

    def maybe_die_for_test(self, table: pa.Table, path: Path) -> None:
        """Only with JANUS_PREPROCESS_TEST_KILL_AT_SHARD=n: leave a half-written temporary shard and SIGKILL
        ourselves, exactly what a job killed inside write_shard leaves behind (used by the resume test)."""
        if self.kill_at and len(self.results) + 1 == self.kill_at:
            sink = pa.BufferOutputStream()
            with pa.ipc.new_file(sink, SAMPLE_SCHEMA) as writer:
                writer.write_table(table)
            data = sink.getvalue().to_pybytes()
            path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(data[:len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    def finish_lost(self) -> None:
        """Shards whose task failed every try (Ray Data drops their blocks): each is written with the records
        that did arrive whole, listed in files_failed, and every other record it is known to hold is counted as
        an INPUT_LOST skip (a tar's count is known only from rows that arrived)."""
        for index in list(self.rows):
            shard, rows, parts = self.shards[index], self.rows[index], self.parts[index]
            arrived = Counter(r["index"] for r in rows)
            whole = {i for i, n in parts.items() if i >= 0 and arrived[i] == n}
            known = max(shard.count, rows[0]["total"] if rows else 0, max(whole, default=-1) + 1)
            reason = (f"its task failed {self.task_tries} times (a worker died, was killed for memory, or raised: see "
                      "the Ray logs); its records are counted as input_lost")
            self.rows[index] = [r for r in rows if r["index"] in whole] + [
                {"key": "", "index": i, "part": 0, "skip": INPUT_LOST, "detail": reason}
                for i in range(known) if i not in whole] + [
                {"key": "", "index": known, "part": 0, "skip": FILE_FAILED, "detail": reason}]
            self.finish(index)


@contextmanager
def ray_connection(address: str = "", cpus: int | None = None, gpus: int | None = None,
                   task_tries: int = DEFAULT_TASK_TRIES) -> Iterator[None]:
    """Join the given cluster, the job's cluster (RAY_ADDRESS under `ray job submit`), or start an embedded
    one that only this job can reach. A connection made here is closed on leaving."""
    if ray.is_initialized():
        yield
        return
    with ExitStack() as stack:
        if address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=address or None, logging_level=logging.WARNING)
        else:
            stack.enter_context(private_ray_settings())
            # address="local": never silently join some other cluster that `ray start` left on this machine.
            # A task killed by Ray's memory monitor is retried under its own count (task_oom_retries, default:
            # without limit), apart from max_retries: bounded here too. A cluster we join keeps its own setting.
            ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False,
                     logging_level=logging.WARNING, _system_config={"task_oom_retries": task_tries - 1})
        stack.callback(ray.shutdown)
        yield


@contextmanager
def private_ray_settings() -> Iterator[None]:
    """An embedded Ray that nothing else can reach: its servers on the loopback address only, and token
    authentication with a token made for this run (in the environment its processes inherit, never on disk),
    even where the environment turned authentication off. Restored on leaving."""
    saved = {k: os.environ.get(k) for k in (SINGLE_NODE_ENV, *AUTH_ENV)}
    saved_cluster = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ.update({SINGLE_NODE_ENV: "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)})
    # This process imported Ray before it knew the run would be embedded: Ray read the single-node switch
    # and the authentication settings then, so apply them here as its new processes will read them.
    ray_constants.ENABLE_RAY_CLUSTER = False
    reload_ray_auth()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        ray_constants.ENABLE_RAY_CLUSTER = saved_cluster
        reload_ray_auth()


def reload_ray_auth() -> None:
    """Make this process use the authentication mode and token now in its environment (Ray caches both)."""
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def run(cfg: JobConfig) -> Manifest:
    """Run (or resume) the job; returns the manifest it wrote."""
    start = time.time()
    out = check_output_path(cfg.output)
    tokenizer = checked(cached_tokenizer, "--tokenizer", cfg.convert.tokenizer)
    vq_fp = None
    if cfg.convert.task == GENERATION:
        from model.vq import load_vq

        if not cfg.vq:
            raise UsageError("generation needs --vq DIR (a JanusVQVAE directory or a Janus checkpoint)")
        vq_fp = weights_fingerprint(checked(load_vq, "--vq", cfg.vq))  # fails early, on the driver
    shards = checked(list_shards, "--input", cfg.inputs, cfg.input_format, cfg.shard_size, cfg.image_root,
                     cfg.class_names)
    if not shards:
        raise UsageError(f"--input: no input shards found in {cfg.inputs}")
    names = [s.output_name() for s in shards]
    if len(set(names)) != len(names):
        raise UsageError("--input: two inputs map to the same output shard name; pass each input once")
    settings = job_settings(cfg, shards, tokenizer_fingerprint(tokenizer), vq_fp)
    shash = settings_hash(settings)

    check_output_owner(out, cfg.convert.task, shash)  # before anything in it is touched
    claim_output(out, cfg.convert.task, shash)
    removed = clean_temporaries(out)
    done = finished_shards(out, shards, shash)
    pending = [s for s in shards if s.index not in done]
    print(f"preprocess {cfg.convert.task}: {len(shards)} input shards, {len(done)} already done, "
          f"{len(pending)} to do -> {out}" + (f" (removed {len(removed)} temporary files)" if removed else ""),
          flush=True)
    results = dict(done)
    if pending:
        (out / MANIFEST_NAME).unlink(missing_ok=True)  # until this run ends, the shards do not match it
        with ray_connection(cfg.address, cfg.cpus, cfg.gpus, cfg.task_tries):
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = cfg.progress and sys.stderr.isatty()
            saved_errored_blocks = context.max_errored_blocks
            context.max_errored_blocks = len(pending)  # a shard whose task failed every try: listed, not fatal
            try:
                assembler = ShardAssembler(out, pending, shash, len(shards), len(done), cfg.task_tries,
                                           cfg.progress_every_s)
                for batch in build_dataset(cfg, pending).iter_batches(batch_format="pyarrow", batch_size=None):
                    assembler.add(batch)
                    assembler.report_progress()
            finally:
                context.max_errored_blocks = saved_errored_blocks
            assembler.finish_lost()
            results.update(assembler.results)
    manifest = write_manifest(out, cfg, shards, results, settings, vq_fp)
    rejected = rejection(manifest, cfg.max_skip_fraction)
    print_summary(manifest, out, shards, len(done), time.time() - start, rejected)
    if rejected:
        raise JobRejected(rejected)
    return manifest


def checked(load, flag: str, *args):
    """`load(*args)`, with a failure to read what the flag names reported as a usage error naming the flag."""
    try:
        return load(*args)
    except (OSError, ValueError) as error:
        raise UsageError(redact(f"{flag}: {error}")) from error  # a URL's credentials never reach the log


def rejection(manifest: Manifest, max_skip_fraction: float) -> str | None:
    """Why this output must not pass for a finished job (None: it may). No row at all is never fine, whatever
    the fraction allows: a job that silently writes nothing is the failure this guards against."""
    skipped = sum(manifest.skipped.values())
    if manifest.rows_written == 0:
        failed = f", {len(manifest.files_failed)} input files failed" if manifest.files_failed else ""
        return f"no row was written ({manifest.rows_in} rows in, {skipped} skipped{failed})"
    if skipped > max_skip_fraction * manifest.rows_in:
        return (f"{skipped} of {manifest.rows_in} rows skipped ({skipped / manifest.rows_in:.0%}), more than "
                f"--max-skip-fraction {max_skip_fraction:g} (a rerun with a higher one keeps the shards written)")
    if len(manifest.files_failed) > max_skip_fraction * len(manifest.shards):  # 999 of 1000 tars unreadable
        return (f"{len(manifest.files_failed)} of {len(manifest.shards)} input shards could not be read, more than "
                f"--max-skip-fraction {max_skip_fraction:g} (a rerun reads them again and keeps the shards written)")
    return None


def write_manifest(out: Path, cfg: JobConfig, shards: list[InputShard], results: dict[int, ShardResult],
                   settings: dict, vq_fp: str | None) -> Manifest:
    ordered = [results[s.index] for s in shards]
    skipped: Counter = Counter()
    for r in ordered:
        skipped.update(r.skipped)
    manifest = Manifest(
        task=cfg.convert.task, tokenizer_fingerprint=settings["tokenizer_fingerprint"], vq_fingerprint=vq_fp,
        vq_dtype=settings["vq_dtype"], settings=settings,
        shards=[ShardEntry(file=r.file, rows=r.rows_written, sha256=r.sha256, bytes=r.bytes) for r in ordered],
        rows_in=sum(r.rows_in for r in ordered), rows_written=sum(r.rows_written for r in ordered),
        skipped=dict(sorted(skipped.items())), files_failed=[f for r in ordered for f in r.files_failed],
    )
    if manifest.task == GENERATION:  # counted over every shard, those kept from an earlier run too
        digests = [prompt_digests(read_shard(out / s.file)) for s in manifest.shards]
        manifest.distinct_prompts, manifest.rows_sharing_a_prompt = prompt_sharing(
            np.concatenate(digests) if digests else np.zeros(0, np.int64))
    manifest.write(out)
    return manifest


def print_summary(manifest: Manifest, out: Path, shards: list[InputShard], n_resumed: int, seconds: float,
                  rejected: str | None = None) -> None:
    size = sum((out / s.file).stat().st_size for s in manifest.shards)
    per_sample = size / max(manifest.rows_written, 1)
    lines = [
        "",
        f"== preprocess {manifest.task}: done in {seconds:.1f}s ==",
        f"output         {out}  ({len(manifest.shards)} shards, {n_resumed} kept from an earlier run)",
        f"rows in        {manifest.rows_in}",
        f"rows written   {manifest.rows_written}",
        f"rows skipped   {sum(manifest.skipped.values())}",
    ]
    lines += [f"  {reason:<20} {count}" for reason, count in manifest.skipped.items()]
    lines.append(f"files failed   {len(manifest.files_failed)}" + (" (the first 10; all in the manifest)"
                                                                 if len(manifest.files_failed) > 10 else ""))
    lines += [f"  {f['source']}: {f['reason']}" for f in manifest.files_failed[:10]]
    lines += [
        f"bytes          {size / 1e6:.2f} MB, {per_sample / 1e3:.1f} KB per sample",
        f"tokenizer      {manifest.tokenizer_fingerprint[:16]}",
    ]
    if manifest.vq_fingerprint:
        lines.append(f"vq             {manifest.vq_fingerprint[:16]} ({manifest.vq_dtype})")
    if manifest.distinct_prompts is not None:
        shared = manifest.rows_sharing_a_prompt
        lines.append(f"prompts        {manifest.distinct_prompts} distinct; {shared} rows share theirs with another row"
                     + (" (such a prompt is trained towards the mixture of its rows' images: right for class names, "
                        "not for captions)" if shared else ""))
    lines.append(f"manifest       {out / MANIFEST_NAME}")
    if rejected:
        lines.append(f"FAILED (exit {EXIT_REJECTED}): {rejected}; the manifest is written to inspect the counts")
    print("\n".join(lines), file=sys.stdout, flush=True)
