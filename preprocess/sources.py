"""Input formats: list the input shards of a dataset (on the driver) and read one shard's raw records (in a task).

An input shard is the unit of work and of output: one output `.arrow` file per input shard, named from it.
- wds:      one webdataset tar per shard (img2dataset layout: key.jpg|png|webp + key.txt / key.json), local
            path or any URL fsspec opens; brace patterns like `{00000..00099}.tar` are expanded.
- llava:    a LLaVA JSON list (`image` str or list, `conversations`), cut into `--shard-size` entries per shard.
- imagenet: class folders `ROOT/<wnid>/*.JPEG` plus a class-name file, cut into `--shard-size` images.
- jsonl:    JSON lines with a text field, cut into `--shard-size` lines per shard (by byte offset).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import fsspec
from braceexpand import braceexpand
from webdataset.tariterators import group_by_keys, tar_file_expander

from preprocess.records import BAD_RECORD, EMPTY_SHARD, IMAGE_MISSING

FORMATS = ("wds", "llava", "imagenet", "jsonl")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
IMAGE_FILE = re.compile(r"\.(jpe?g|png|webp|bmp|gif|tiff?)$", re.IGNORECASE)


@dataclass
class InputShard:
    """One unit of work. `source` names it (path/URL + slice) and decides the output file name."""

    index: int
    format: str
    source: str
    path: str = ""
    start: int = 0  # jsonl: byte offset; llava/imagenet: first entry
    count: int = 0
    entries: list = field(default_factory=list)  # llava entries or imagenet [path, class name] pairs
    image_root: str = ""

    def output_name(self) -> str:
        """Deterministic and stable when other inputs are added: readable stem + hash of the source."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.source.split("#")[0]).name)
        stem = re.sub(r"\.(tar|json|jsonl)$", "", stem)[:60]
        digest = hashlib.sha256(self.source.encode()).hexdigest()[:10]
        return f"{stem}-{digest}.arrow"

    def to_dict(self) -> dict:
        return asdict(self)


def detect_format(path: str) -> str:
    if path.endswith(".tar") or "{" in path:
        return "wds"
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".json"):
        return "llava"
    if os.path.isdir(path):
        return "imagenet"
    raise ValueError(f"cannot tell the input format of {path!r}; pass --input-format ({', '.join(FORMATS)})")


def expand_inputs(inputs: list[str]) -> list[str]:
    """Brace patterns and local globs expanded, in a stable order; URLs pass through."""
    out = []
    for pattern in inputs:
        for item in braceexpand(pattern):
            if "://" not in item and any(c in item for c in "*?["):
                matches = sorted(glob.glob(item))
                if not matches:
                    raise FileNotFoundError(f"no input matches {item!r}")
                out += matches
            else:
                out.append(item)
    return out


def list_shards(inputs: list[str], fmt: str, shard_size: int, image_root: str = "",
                class_names: str = "") -> list[InputShard]:
    paths = expand_inputs(inputs)
    shards: list[InputShard] = []
    for path in paths:
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind == "wds":
            shards.append(InputShard(len(shards), kind, path, path=path))
        elif kind == "jsonl":
            shards += jsonl_shards(path, shard_size, len(shards))
        elif kind == "llava":
            shards += llava_shards(path, shard_size, image_root, len(shards))
        elif kind == "imagenet":
            shards += imagenet_shards(path, shard_size, class_names, len(shards))
        else:
            raise ValueError(f"unknown input format {kind!r}; choose one of {FORMATS}")
    return shards


def jsonl_shards(path: str, shard_size: int, first: int) -> list[InputShard]:
    """Byte offsets of every `shard_size`-th line, so a task seeks straight to its slice."""
    starts, lines, offset = [], 0, 0
    with fsspec.open(path, "rb") as f:
        for line in f:
            if lines % shard_size == 0:
                starts.append(offset)
            lines += 1
            offset += len(line)
    counts = [min(shard_size, lines - i * shard_size) for i in range(len(starts))]
    return [InputShard(first + i, "jsonl", f"{path}#{i}", path=path, start=s, count=c)
            for i, (s, c) in enumerate(zip(starts, counts, strict=True))]


def llava_shards(path: str, shard_size: int, image_root: str, first: int) -> list[InputShard]:
    with fsspec.open(path, "rb") as f:
        entries = json.load(f)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: a LLaVA JSON file holds a list of samples, found {type(entries).__name__}")
    root = image_root or str(Path(path).parent)
    chunks = [entries[i:i + shard_size] for i in range(0, len(entries), shard_size)] or [[]]
    return [InputShard(first + i, "llava", f"{path}#{i}", path=path, start=i * shard_size, count=len(chunk),
                       entries=chunk, image_root=root) for i, chunk in enumerate(chunks)]


def read_class_names(path: str) -> dict[str, str]:
    """wnid -> prompt. Accepts `wnid name, synonym, ...` lines (LOC_synset_mapping.txt) or JSON
    (`{wnid: name}`, or Keras' `{"0": [wnid, name]}`). The first synonym is the prompt."""
    if not path:
        raise ValueError("ImageNet-style input needs --class-names FILE (wnid -> category name)")
    text = Path(path).read_text(encoding="utf-8")
    names: dict[str, str] = {}
    if path.endswith(".json"):
        data = json.loads(text)
        for key, value in data.items():
            if isinstance(value, list):
                names[value[0]] = value[1]
            else:
                names[key] = value
    else:
        for line in text.splitlines():
            if line.strip():
                wnid, _, name = line.strip().partition(" ")
                names[wnid] = name
    return {wnid: name.split(",")[0].strip().replace("_", " ") for wnid, name in names.items()}


def imagenet_shards(root: str, shard_size: int, class_names: str, first: int) -> list[InputShard]:
    names = read_class_names(class_names)
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    unknown = [d for d in folders if d not in names]
    if unknown:
        raise ValueError(f"{root}: class folder(s) {unknown[:5]} missing from {class_names}")
    files = [[f"{d}/{f}", names[d]] for d in folders for f in sorted(os.listdir(os.path.join(root, d)))
             if IMAGE_FILE.search(f)]
    chunks = [files[i:i + shard_size] for i in range(0, len(files), shard_size)] or [[]]
    return [InputShard(first + i, "imagenet", f"{root.rstrip('/')}#{i}", path=root, start=i * shard_size,
                       count=len(chunk), entries=chunk, image_root=root) for i, chunk in enumerate(chunks)]


def _record(index: int, key: str, images: list[bytes] | None = None, text: bytes | None = None,
            meta: dict | None = None, error: str | None = None) -> dict:
    return {"index": index, "key": key, "images": images or [], "text": text,
            "meta": json.dumps(meta, sort_keys=True) if meta else None, "error": error}


def read_wds(shard: InputShard) -> Iterator[dict]:
    """Samples of a tar grouped by key (webdataset); the first image suffix present is the image."""
    with fsspec.open(shard.path, "rb") as stream:
        for i, sample in enumerate(group_by_keys(tar_file_expander([{"url": shard.path, "stream": stream}]))):
            image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
            meta = None
            if "json" in sample:
                try:
                    meta = json.loads(sample["json"])
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = None  # img2dataset metadata is optional; a broken one only loses the caption source
                meta = meta if isinstance(meta, dict) else None
            yield _record(i, sample["__key__"], [image] if image is not None else [], sample.get("txt"), meta,
                          None if image is not None else IMAGE_MISSING)


def _read_file(path: str) -> bytes | None:
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def read_llava(shard: InputShard) -> Iterator[dict]:
    for i, entry in enumerate(shard.entries):
        key = str(entry.get("id", shard.start + i)) if isinstance(entry, dict) else str(shard.start + i)
        if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
            yield _record(i, key, error=BAD_RECORD)
            continue
        names = entry.get("image") or []
        names = [names] if isinstance(names, str) else names
        images = [_read_file(os.path.join(shard.image_root, n)) for n in names]
        error = IMAGE_MISSING if any(b is None for b in images) else None
        yield _record(i, key, [b for b in images if b is not None], meta={"conversations": entry["conversations"]},
                      error=error)


def read_imagenet(shard: InputShard) -> Iterator[dict]:
    for i, (relpath, name) in enumerate(shard.entries):
        data = _read_file(os.path.join(shard.image_root, relpath))
        yield _record(i, relpath, [data] if data is not None else [], meta={"class_name": name},
                      error=None if data is not None else IMAGE_MISSING)


def read_jsonl(shard: InputShard) -> Iterator[dict]:
    with fsspec.open(shard.path, "rb") as f:
        f.seek(shard.start)
        for i in range(shard.count):
            line = f.readline().rstrip(b"\r\n")
            yield _record(i, f"{Path(shard.source).name}:{i}", text=line)


READERS = {"wds": read_wds, "llava": read_llava, "imagenet": read_imagenet, "jsonl": read_jsonl}


def read_shard_records(shard: InputShard) -> list[dict]:
    """All raw records of one input shard, each knowing the shard's total (how the driver knows it is done)."""
    records = list(READERS[shard.format](shard))
    if not records:
        records = [_record(-1, "", error=EMPTY_SHARD)]
    total = 0 if records[0]["error"] == EMPTY_SHARD else len(records)
    return [{**r, "shard": shard.index, "total": total} for r in records]
