"""The output contract between preprocessing and training: Arrow shards plus `manifest.json`.

Shards are Arrow IPC *files* (memory-mappable) in SAMPLE_SCHEMA, each written under a temporary name
and renamed when complete. The manifest records what made them (schema version, task, settings,
tokenizer and VQ fingerprints) and, per shard, its rows and sha256, plus the row accounting
`rows_in = rows_written + sum(skipped.values())` and the input files that could not be read to their end
(`files_failed`: their records read before the fault are counted in rows_in). A generation manifest also counts
its distinct prompts and the rows that share theirs with another row: a model conditioned on the prompt alone can
learn only the mixture of such rows' images (docs/facts.md, "Memorisation and guidance"). Both preprocess/ and
pipeline/ use this module.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import torch

from model.sample import SAMPLE_SCHEMA, SCHEMA_VERSION

MANIFEST_NAME = "manifest.json"


@dataclass
class ShardEntry:
    file: str  # relative to the manifest's directory
    rows: int
    sha256: str
    bytes: int | None = None  # None in manifests written before sizes were recorded


@dataclass
class Manifest:
    task: str
    tokenizer_fingerprint: str
    vq_fingerprint: str | None = None
    vq_dtype: str | None = None
    settings: dict = field(default_factory=dict)
    shards: list[ShardEntry] = field(default_factory=list)
    rows_in: int = 0
    rows_written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    files_failed: list[dict] = field(default_factory=list)  # {"source", "reason"} per input file
    # Generation only (None elsewhere, and in manifests written before they were counted): prompt_sharing's counts.
    distinct_prompts: int | None = None
    rows_sharing_a_prompt: int | None = None

    def check_accounting(self) -> None:
        if self.rows_in != self.rows_written + sum(self.skipped.values()):
            raise ValueError(f"rows_in {self.rows_in} != rows_written {self.rows_written} + skipped {self.skipped}")
        if self.rows_written != sum(s.rows for s in self.shards):
            raise ValueError(f"rows_written {self.rows_written} != the shards' rows {sum(s.rows for s in self.shards)}")

    def size_problems(self, root: Path) -> list[str]:
        """Shards missing or not of their recorded size: a stat per shard, so every shard of a 72M-row dataset is
        checked in seconds before training starts (their hashes are checked once across the job's ranks)."""
        found = ((shard.file, size_problem(root / shard.file, shard.bytes)) for shard in self.shards)
        return [f"{name} {problem}" for name, problem in found if problem]

    def write(self, directory: str | Path) -> Path:
        self.check_accounting()
        path = Path(directory) / MANIFEST_NAME
        atomic_write_bytes(path, (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode())
        return path

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / MANIFEST_NAME
        data = json.loads(path.read_text())
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"{path}: schema version {data.get('schema_version')}, this code reads {SCHEMA_VERSION}")
        data["shards"] = [ShardEntry(**s) for s in data["shards"]]
        for shard in data["shards"]:
            if not inside_folder(shard.file):  # a manifest is data: it must not point a reader elsewhere
                raise ValueError(f"{path}: shard file {shard.file!r} is not inside the manifest's folder")
        for count in ("distinct_prompts", "rows_sharing_a_prompt"):  # printed at a run's start: a count or nothing
            value = data.get(count)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"{path}: {count} is {value!r}, not a count")
        return cls(**data)


def inside_folder(name: object) -> bool:
    """Whether a manifest's `file` entry names a file in or under the manifest's folder (no absolute path,
    no `..`, either slash)."""
    if not isinstance(name, str) or not name:
        return False
    path = PurePosixPath(name.replace("\\", "/"))
    return not path.is_absolute() and ".." not in path.parts and ":" not in path.parts[0]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_shard(table: pa.Table, path: str | Path) -> ShardEntry:
    """Write an Arrow IPC file under a temporary name, then rename it into place."""
    path = Path(path)
    if not table.schema.remove_metadata().equals(SAMPLE_SCHEMA.remove_metadata()):
        raise ValueError(f"shard table is not in SAMPLE_SCHEMA:\n{table.schema}")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SAMPLE_SCHEMA) as writer:
        writer.write_table(table.cast(SAMPLE_SCHEMA))
    os.replace(tmp, path)
    return ShardEntry(file=path.name, rows=table.num_rows, sha256=file_sha256(path), bytes=path.stat().st_size)


def read_shard(path: str | Path) -> pa.Table:
    """A shard, memory-mapped."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def prompt_digests(table: pa.Table) -> np.ndarray:
    """[rows] int64: a 64-bit hash of each row's `input_ids` (a generation row's whole prompt, BOS to
    <begin_of_image>). Python's hash of bytes: equal only within one process, which is where they are compared."""
    ids = table.column("input_ids").combine_chunks()
    raw = ids.values.to_numpy().astype("<i4", copy=False).tobytes()
    bounds = (4 * ids.offsets.to_numpy()).tolist()
    rows = zip(bounds[:-1], bounds[1:], strict=True)
    return np.fromiter((hash(raw[a:b]) for a, b in rows), dtype=np.int64, count=len(ids))


def prompt_sharing(digests: np.ndarray) -> tuple[int, int]:
    """(distinct prompts, rows whose prompt another row has too) of prompt_digests over a dataset's shards.
    A 64-bit hash: at 10^8 rows a collision (two rows counted as sharing) has odds of about 1 in 4,000."""
    counts = np.unique(digests, return_counts=True)[1]
    return len(counts), int(counts[counts > 1].sum())


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_problem(path: Path, sha256: str, size: int | None = None) -> str | None:
    """What is wrong with a file against its recorded sha256 (and size, when recorded), or None: shards against
    their manifest, checkpoint files against their COMPLETE."""
    problem = size_problem(path, size)
    if problem is None and file_sha256(path) != sha256:
        problem = "does not match its sha256"
    return problem


def size_problem(path: Path, size: int | None) -> str | None:
    """Whether a file is missing or not of its recorded size (None: not recorded), by a stat alone."""
    if not path.is_file():
        return "is missing"
    if size is not None and path.stat().st_size != size:
        return f"has {path.stat().st_size} bytes, not {size}"
    return None


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full serialised form (vocab, merges, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over a module's tensors (name, shape, values rounded to bf16), in name order.

    Rounded to bf16 so that one VQ has one fingerprint whatever precision holds it: preprocessing loads it as
    stored (fp32), a bf16 ZeRO-3 run holds it in bf16, and a consolidated checkpoint gives fp32 of those bf16
    values; all three round to the same bf16 bits.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu()
        t = (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
