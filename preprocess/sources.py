"""Input formats: list the input shards of a dataset (on the driver) and read one shard's raw records (in a task).

An input shard is the unit of work and of output: one output `.arrow` file per input shard, named from it.
- wds:      one webdataset tar per shard (img2dataset layout: key.jpg|png|webp + key.txt / key.json), plain or
            gzip/bzip2/xz-compressed, local path or any URL fsspec opens; brace patterns like `{00000..00099}.tar`
            are expanded.
- llava:    LLaVA records (`image` str or list, `conversations` of from/value), cut into `--shard-size` records.
- sharegpt: ShareGPT/LLaMA-Factory records (`messages` of role/content, `images`), cut the same way.
- jsonl:    JSON lines with a text field, cut into `--shard-size` lines per shard (by byte offset).
- imagenet: class folders `ROOT/<wnid>/*.JPEG` plus a class-name file, cut into `--shard-size` images.
- captions: image-caption pairs, `{"image": path, "caption": text}` records (JSON lines or a JSON list) or a `.csv`
            with header columns image,caption (read whole on the driver, as a JSON list is), image paths relative
            to `--image-root` (else to the file's folder), cut into `--shard-size` records.

A `.json`/`.jsonl` file is one JSON list or JSON lines (its first character decides), and its first record that
is a JSON object decides its format: `conversations` -> llava, `messages` -> sharegpt, `image` and `caption` ->
captions, else (lines) jsonl text. A `.csv` file is captions.
`--input-format` overrides that for every input. A record not in its file's format is a skip, never reread as
another format.

Nothing read here stops the job: a file that cannot be read is listed in the manifest's files_failed, a tar that
breaks part way keeps the records before the break, and a bad record is a counted skip. `source` (what the
manifest, logs and skip records name) never holds credentials: see `redact`.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import hashlib
import io
import json
import lzma
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

import fsspec
from braceexpand import braceexpand
from webdataset.tariterators import base_plus_ext

from preprocess.records import (
    BAD_RECORD,
    CHAT_FORMATS,
    DUPLICATE_MEMBER,
    EMPTY_SHARD,
    FILE_FAILED,
    IMAGE_MISSING,
    IMAGE_PATH_UNSAFE,
    IMAGE_TOO_LARGE,
    MAX_IMAGE_BYTES,
    MAX_JSON_BYTES,
    MAX_JSON_DEPTH,
    MAX_MEMBER_BYTES,
    MAX_RECORD_BYTES,
    MEMBER_NOT_FILE,
    TAR_TRUNCATED,
    TOO_LONG,
    UNKNOWN_FORMAT,
    Skip,
    nesting,
    parse_json,
    printable,
    type_name,
    unforeseen,
    valid_text,
)

FORMATS = ("wds", "llava", "sharegpt", "imagenet", "jsonl", "captions")
CAPTIONS = "captions"
CAPTION_FIELDS = ("image", "caption")  # a captions record's fields; a CSV's header names them
CHATS = {chat.name: chat for chat in CHAT_FORMATS}
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
IMAGE_FILE = re.compile(r"\.(jpe?g|png|webp|bmp|gif|tiff?)$", re.IGNORECASE)
TAR_FILE = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz)$")
DETECT_LINES = 100  # JSON lines: how far to look for the first record that is an object
WDS_META = re.compile(r"__[^/]*__($|/)")  # webdataset's own metadata members (`__key__`...): not sample data

# user:password@ in a URL, and the value of any query parameter that looks like a credential (S3/GCS presigned
# X-*-Signature/-Credential/-Security-Token, Azure SAS `sig`, `token`, `access_token`, `api_key`, ...).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^\s/?#@]*(?::[^\s@]*)?@")
_SECRET_PARAM = re.compile(r"(?P<name>[?&;][^=&#\s]*(?:sig|token|key|secret|credential|passw|auth|session)[^=&#\s]*=)"
                           r"[^&#\s'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by `***`: what manifests, logs and skip details may
    hold. Applied where `source` is built and to every failure message a reader makes."""
    return _SECRET_PARAM.sub(r"\g<name>***", _USERINFO.sub(r"\g<scheme>***@", text))


@dataclass
class InputShard:
    """One unit of work. `source` names it (redacted path/URL + slice) and decides the output file name;
    `path` is what to open, credentials included, and is never written anywhere."""

    index: int
    format: str
    source: str
    path: str = ""
    start: int = 0  # JSON lines: byte offset; JSON list / imagenet: first entry
    count: int = 0
    entries: list = field(default_factory=list)  # JSON-list records or imagenet [path, class name] pairs
    image_root: str = ""
    lines: bool = False  # records are the `count` lines from byte `start` (else `entries`)
    failure: str = ""  # the file could not be listed: the shard stands for it in files_failed

    def output_name(self) -> str:
        """Deterministic and stable when other inputs are added: readable stem + hash of the source."""
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(file_part(self.source.split("#")[0])).name)
        stem = re.sub(r"\.(tar|json|jsonl|csv)$", "", stem)[:60]
        digest = hashlib.sha256(self.source.encode()).hexdigest()[:10]
        return f"{stem}-{digest}.arrow"

    def to_dict(self) -> dict:
        return asdict(self)


def file_part(path: str) -> str:
    """A URL without its query (`?X-Amz-...`), so that its name ends in the file's extension."""
    return urlsplit(path).path if "://" in path else path


def fault(exc: BaseException) -> str:
    """One line naming an exception, credentials removed (exceptions of fsspec and HTTP clients quote URLs)."""
    return redact(f"{type(exc).__name__}: {exc}")[:500]


# --- listing (driver) ---

def path_kind(path: str, fmt: str) -> str:
    """wds, imagenet, csv, or json (a JSON list or JSON lines, whose records decide llava/sharegpt/captions/jsonl)."""
    if fmt in ("wds", "imagenet"):
        return fmt
    name = file_part(path)
    if name.lower().endswith(".csv"):
        return "csv"
    if fmt != "auto":
        return "json"
    if TAR_FILE.search(name) or "{" in name:
        return "wds"
    if name.endswith((".json", ".jsonl")):
        return "json"
    if os.path.isdir(path):
        return "imagenet"
    raise ValueError(f"cannot tell the input format of {redact(path)!r}; pass --input-format ({', '.join(FORMATS)})")


def expand_inputs(inputs: list[str]) -> list[str]:
    """Brace patterns and local globs expanded, in a stable order, each input once: a local path is named in its
    normal form (`./a.jsonl` and `a.jsonl` are one input) and the same file reached by two names is read once; URLs
    pass through."""
    out, seen = [], set()
    for pattern in inputs:
        for item in braceexpand(pattern):
            if "://" not in item and any(c in item for c in "*?["):
                matches = sorted(glob.glob(item))
                if not matches:
                    raise FileNotFoundError(f"no input matches {item!r}")
            else:
                matches = [item]
            for match in matches:
                name = match if "://" in match else os.path.normpath(match)
                identity = name if "://" in match else os.path.realpath(name)
                if identity not in seen:
                    seen.add(identity)
                    out.append(name)
    return out


def list_shards(inputs: list[str], fmt: str, shard_size: int, image_root: str = "",
                class_names: str = "") -> list[InputShard]:
    if fmt not in ("auto", *FORMATS):
        raise ValueError(f"unknown input format {fmt!r}; choose one of {FORMATS}")
    shards: list[InputShard] = []
    for path in expand_inputs(inputs):
        kind = path_kind(path, fmt)
        if kind == "wds":
            shards.append(InputShard(len(shards), kind, redact(path), path=path))
        elif kind == "imagenet":
            shards += imagenet_shards(path, shard_size, class_names, len(shards))
        else:
            try:
                read = csv_shards if kind == "csv" else json_shards
                shards += read(path, fmt, shard_size, image_root, len(shards))
            except Exception as exc:  # unreadable or not JSON: the job goes on, the manifest lists the file
                shards.append(InputShard(len(shards), "failed", f"{redact(path)}#0", path=path, failure=fault(exc)))
    return shards


def json_shards(path: str, fmt: str, shard_size: int, image_root: str, first: int) -> list[InputShard]:
    """A JSON list (`[` first) or JSON lines, cut into `shard_size` records; its records decide the format."""
    root = image_root or posixpath.dirname(path) or "."
    with fsspec.open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()  # a UTF-8 byte-order mark, then blanks
        f.seek(0)
        if head.startswith(b"["):
            entries = json.load(f)
            kind = fmt if fmt != "auto" else (list_format(entries) or "llava")
            entries = [shallow_entry(e) for e in entries]
            chunks = [entries[i:i + shard_size] for i in range(0, len(entries), shard_size)] or [[]]
            return [InputShard(first + i, kind, f"{redact(path)}#{i}", path=path, start=i * shard_size,
                               count=len(chunk), entries=chunk, image_root=root) for i, chunk in enumerate(chunks)]
        starts, lines, kind = line_starts(f, shard_size)
    kind = fmt if fmt != "auto" else kind
    counts = [min(shard_size, lines - i * shard_size) for i in range(len(starts))]
    return [InputShard(first + i, kind, f"{redact(path)}#{i}", path=path, start=s, count=c, image_root=root,
                       lines=True) for i, (s, c) in enumerate(zip(starts, counts, strict=True))]


def csv_shards(path: str, fmt: str, shard_size: int, image_root: str, first: int) -> list[InputShard]:
    """A CSV of image-caption pairs (header columns image,caption; others, an `id` among them, kept), read whole
    here as a JSON list is and cut into `shard_size` rows; each row goes on as the record it stands for. A file
    the csv module cannot parse (a field over its limit, a NUL byte) or without both columns is a failed file."""
    root = image_root or posixpath.dirname(path) or "."
    with fsspec.open(path, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8-sig", newline="")
        reader = csv.DictReader(text)
        missing = [name for name in CAPTION_FIELDS if name not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"a captions CSV has a header row naming {', '.join(CAPTION_FIELDS)}; "
                             f"{', '.join(missing)} missing from {reader.fieldnames}")
        # DictReader puts a row's extra cells under None: not a field any record has.
        entries = [{k: v for k, v in row.items() if k is not None} for row in reader]
    kind = CAPTIONS if fmt == "auto" else fmt
    chunks = [entries[i:i + shard_size] for i in range(0, len(entries), shard_size)] or [[]]
    return [InputShard(first + i, kind, f"{redact(path)}#{i}", path=path, start=i * shard_size, count=len(chunk),
                       entries=chunk, image_root=root) for i, chunk in enumerate(chunks)]


# Stands in for a JSON-list entry nested deeper than MAX_JSON_DEPTH: the entry itself never leaves the driver (Ray
# pickles what tasks get, and pickle recurses per level too).
TOO_DEEP = "__entry_nested_too_deep__"


def shallow_entry(entry: object) -> object:
    """`entry`, or a TOO_DEEP marker in its place if it nests deeper than MAX_JSON_DEPTH."""
    depth = nesting(entry)
    return entry if depth <= MAX_JSON_DEPTH else {TOO_DEEP: depth}


def check_entry(entry: object) -> None:
    if isinstance(entry, dict) and TOO_DEEP in entry:
        raise Skip(BAD_RECORD, f"entry: JSON nested {entry[TOO_DEEP]} deep, more than {MAX_JSON_DEPTH}")


def record_format(record: object) -> str | None:
    """The format whose identifying fields a record has, if any: a chat format's conversation field, else both
    captions fields."""
    if not isinstance(record, dict):
        return None
    chat = next((chat.name for chat in CHAT_FORMATS if chat.field in record), None)
    return chat or (CAPTIONS if all(name in record for name in CAPTION_FIELDS) else None)


def list_format(entries: object) -> str | None:
    """The format of a JSON list: its first object's."""
    if not isinstance(entries, list):
        raise ValueError(f"a JSON input holds a list of records, found {type_name(entries)}")
    return record_format(next((e for e in entries if isinstance(e, dict)), None))


def line_starts(f, shard_size: int) -> tuple[list[int], int, str]:
    """Byte offsets of every `shard_size`-th line (so a task seeks straight to its slice), the number of lines,
    and the format of the first line that is a JSON object (jsonl text if it is in no chat format, or if none of
    the first DETECT_LINES lines is an object)."""
    starts, lines, offset, kind = [], 0, 0, None
    for line in f:
        if lines % shard_size == 0:
            starts.append(offset)
        if kind is None and lines < DETECT_LINES:
            kind = line_object_format(line)
        lines += 1
        offset += len(line)
    return starts, lines, kind or "jsonl"


def line_object_format(line: bytes) -> str | None:
    """For detection: the format of a line that is a JSON object; None when it is not one (look further)."""
    try:
        record = parse_json(line, "line")
    except Skip:
        return None
    return (record_format(record) or "jsonl") if isinstance(record, dict) else None


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


# --- reading (tasks) ---

class InputFault(Exception):
    """The input file broke after some of its records were read; the message says where and why."""


def _record(index: int, key: str, images: list[bytes] | None = None, text: bytes | None = None,
            meta: dict | None = None, error: str | None = None, detail: str = "") -> dict:
    return {"index": index, "key": key, "images": images or [], "text": text,
            "meta": json.dumps(meta, sort_keys=True) if meta else None, "error": error,
            "detail": redact(detail)[:500] if detail else None}


def _skipped(index: int, key: str, skip: Skip) -> dict:
    return _record(index, key, error=skip.reason, detail=skip.detail)


class _Prefixed:
    """A stream with its first bytes (read to sniff the compression) put back in front."""

    def __init__(self, head: bytes, rest) -> None:
        self.head, self.rest = head, rest

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(size)
        if size is None or size < 0:
            out, self.head = self.head + self.rest.read(), b""
        else:
            out, self.head = self.head[:size], self.head[size:]
        return out


class _TarBytes:
    """The uncompressed tar stream as tarfile reads it, remembering where it last held a non-zero byte."""

    def __init__(self, raw) -> None:
        self.raw, self.pos, self.data_end = raw, 0, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.raw.read(size)
        used = len(chunk.rstrip(b"\0"))
        if used:
            self.data_end = self.pos + used
        self.pos += len(chunk)
        return chunk


def uncompressed(stream) -> _TarBytes:
    """Decompress here rather than in tarfile: these readers raise on a bad CRC or a cut stream, which tarfile's
    own stream mode can pass over quietly."""
    head = stream.read(6)
    raw = _Prefixed(head, stream)
    if head.startswith(b"\x1f\x8b"):
        raw = gzip.GzipFile(fileobj=raw, mode="rb")
    elif head.startswith(b"BZh"):
        raw = bz2.BZ2File(raw)
    elif head.startswith(b"\xfd7zXZ\x00"):
        raw = lzma.LZMAFile(raw)
    return _TarBytes(raw)


def tar_end_problem(data: _TarBytes, offset: int) -> str | None:
    """Why a tar that tarfile finished at header `offset` did not really end there, or None.

    tarfile (stream mode, as webdataset uses it) takes a header cut short or not a header at all for the end of
    the archive, so a tar cut at a member boundary or corrupt past its first member reads as shorter and whole.
    A tar that ends ends in zero blocks: everything from `offset` on must be zeros, a block of them at least."""
    for _ in iter(partial(data.read, 1 << 16), b""):  # to the end: a compressed tar checks its CRC there
        if data.data_end > offset:
            return f"not a tar header at byte {offset}: the tar is corrupt there"
    if data.pos - offset < tarfile.BLOCKSIZE:
        return f"the tar ends at byte {data.pos}, inside a header or before its end-of-archive blocks"
    return None


Member = tuple[str, "bytes | Skip | None"]  # a name and its bytes; None: a link or device; Skip: left unread


def member_data(tar: tarfile.TarFile, member: tarfile.TarInfo, held: dict[str, int]) -> bytes | Skip | None:
    """A member's bytes, or None for a link or device, or the Skip of a member too large to read: one larger than
    MAX_MEMBER_BYTES, or one taking its sample (`held`: bytes read per key) past MAX_RECORD_BYTES. A member left
    unread is passed over by tarfile in blocks, never held (a 9 MB .tar.gz can hold a 2 GiB member)."""
    if not member.isreg():
        return None
    kind = IMAGE_TOO_LARGE if IMAGE_FILE.search(member.name) else TOO_LONG
    if member.size > MAX_MEMBER_BYTES:
        return Skip(kind, f"{printable(member.name)[:100]}: {member.size} bytes, more than a member may hold "
                          f"({MAX_MEMBER_BYTES})")
    key = base_plus_ext(member.name)[0] or member.name
    if held.get(key, 0) + member.size > MAX_RECORD_BYTES:
        return Skip(kind, f"{printable(member.name)[:100]}: the sample's members hold more than {MAX_RECORD_BYTES} "
                          "bytes")
    held[key] = held.get(key, 0) + member.size
    return tar.extractfile(member).read()


def tar_members(stream) -> tuple[list[Member], str | None, str | None]:
    """(name, data) for each member but folders until the tar ends or breaks (see member_data), then why it broke
    (or None) and the name of the member being read when it did (or None: between members)."""
    members: list[Member] = []
    reading, held = None, {}
    try:
        data = uncompressed(stream)
        with tarfile.open(fileobj=data, mode="r|") as tar:
            for member in tar:
                if member.isdir():
                    continue  # structure, not data (a folder named like `key.jpg` leaves that sample without it)
                reading = member.name
                members.append((member.name, member_data(tar, member, held)))
                reading = None
                tar.members = []  # stream mode keeps every header otherwise
            problem = tar_end_problem(data, tar.offset)
    except Exception as exc:  # tarfile, gzip, zlib, lzma, fsspec: any of them means the bytes stop making sense
        problem = fault(exc)
    return members, problem, reading


def group_members(members: list[Member]) -> tuple[dict[str, dict], dict[str, Skip]]:
    """Members grouped into samples by key (webdataset's key.ext rule; suffixes lower-cased), first seen first,
    and the samples that cannot be trusted: a name seen twice, not UTF-8, a member not a file or too large."""
    groups: dict[str, dict] = {}
    problems: dict[str, Skip] = {}
    for name, data in members:
        key, suffix = base_plus_ext(name)
        if key is None or WDS_META.match(name):
            continue  # a directory, a README, webdataset's own metadata: not part of a sample
        try:
            valid_text(name, "member name", BAD_RECORD)  # tarfile keeps bytes that are not UTF-8 as surrogates
        except Skip as skip:
            key = printable(key)  # a key Arrow can store, for the skip
            problems.setdefault(key, skip)
        group = groups.setdefault(key, {})
        suffix = suffix.lower()
        if isinstance(data, Skip):
            problems.setdefault(key, data)
        elif data is None:
            problems.setdefault(key, Skip(MEMBER_NOT_FILE, f"{name}: a symlink, link or device, not a file"))
        elif suffix in group:
            problems[key] = Skip(DUPLICATE_MEMBER, f"{name}: twice in the tar")
        else:
            group[suffix] = data
    return groups, problems


def sidecar_meta(data: bytes) -> dict:
    """A sample's `key.json`, checked where this job reads it (caption, text, conversations)."""
    meta = parse_json(data, "json")
    if not isinstance(meta, dict):
        raise Skip(BAD_RECORD, f"json: expected an object, got {type_name(meta)}")
    for name in ("caption", "text"):
        if meta.get(name) is not None and not isinstance(meta[name], str):
            raise Skip(BAD_RECORD, f"json.{name}: expected a string, got {type_name(meta[name])}")
    for chat in CHAT_FORMATS:
        if chat.field in meta and not isinstance(meta[chat.field], list):
            raise Skip(BAD_RECORD, f"json.{chat.field}: expected a list, got {type_name(meta[chat.field])}")
    return meta


def wds_record(index: int, key: str, sample: dict) -> dict:
    image = next((sample[s] for s in IMAGE_SUFFIXES if s in sample), None)
    try:
        meta = sidecar_meta(sample["json"]) if "json" in sample else None
    except Skip as skip:
        return _skipped(index, key, skip)
    return _record(index, key, [image] if image is not None else [], sample.get("txt"), meta,
                   None if image is not None else IMAGE_MISSING)


def read_wds(shard: InputShard) -> Iterator[dict]:
    """One record per key of the tar. Where the tar breaks, the records before stay, the one being read is
    a `tar_truncated` skip, and InputFault says why (the shard lists the file in files_failed)."""
    with fsspec.open(shard.path, "rb") as stream:
        members, problem, reading = tar_members(stream)
    groups, problems = group_members(members)
    if problem:
        at = base_plus_ext(reading)[0] if reading else None
        at = at or (base_plus_ext(members[-1][0])[0] if members else None)
        if at is not None:
            groups.setdefault(at, {})
            problems[at] = Skip(TAR_TRUNCATED, f"{problem}, reading {reading or 'the next header'}")
    for i, (key, sample) in enumerate(groups.items()):
        yield _skipped(i, key, problems[key]) if key in problems else guarded(wds_record, i, key, sample)
    if problem:
        raise InputFault(f"{problem}; {len(groups)} record(s) read before it" if groups else problem)


def image_names(value: object, name: str) -> list[tuple[str, str]]:
    """(field, path) of a record's images (`value`: one path or a list), each relative and inside the root."""
    if value is None:
        return []
    if not isinstance(value, (str, list)):
        raise Skip(BAD_RECORD, f"{name}: expected a string or a list of strings, got {type_name(value)}")
    named = [(name, value)] if isinstance(value, str) else [(f"{name}[{j}]", v) for j, v in enumerate(value)]
    for where, item in named:
        if not isinstance(item, str) or not item:
            raise Skip(BAD_RECORD, f"{where}: expected a file name, got {type_name(item) if item else 'nothing'}")
        norm = posixpath.normpath(item.replace("\\", "/"))
        if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or "://" in item:
            raise Skip(IMAGE_PATH_UNSAFE, f"{where}: {item[:100]!r} leaves the image root")
    return named


def read_file(root: str, name: str, where: str, confined: bool = True) -> bytes:
    """An image file's bytes, at most MAX_IMAGE_BYTES: a regular file (local; with `confined`, one whose real path
    is under `root`'s: a record names it), or what fsspec opens."""
    try:
        if "://" not in root:
            return local_file_bytes(root, name, where, confined)
        with fsspec.open(posixpath.join(root, name), "rb") as f:
            return capped(f.read(MAX_IMAGE_BYTES + 1), where, name)
    except FileNotFoundError as exc:
        raise Skip(IMAGE_MISSING, f"{where}: {name[:100]!r} not found") from exc
    except IsADirectoryError as exc:
        raise Skip(BAD_RECORD, f"{where}: {name[:100]!r} is a directory, not an image file") from exc
    except (OSError, ValueError) as exc:
        raise Skip(IMAGE_MISSING, f"{where}: {name[:100]!r} unreadable: {fault(exc)}") from exc


def capped(data: bytes, where: str, name: str) -> bytes:
    if len(data) > MAX_IMAGE_BYTES:
        raise Skip(IMAGE_TOO_LARGE, f"{where}: {name[:100]!r} holds more than {MAX_IMAGE_BYTES} bytes")
    return data


def local_file_bytes(root: str, name: str, where: str, confined: bool = True) -> bytes:
    """A local image: only a regular file, with `confined` one whose real path (symlinks resolved) is under the
    root's. Opened without blocking and checked on the open descriptor: a FIFO would block the task for ever, a
    device (a symlink to /dev/zero) would fill its memory."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, name))
    if confined and os.path.commonpath([base, path]) != base:
        raise Skip(IMAGE_PATH_UNSAFE, f"{where}: {name[:100]!r} leaves the image root through a symlink")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(mode):
            raise Skip(BAD_RECORD, f"{where}: {name[:100]!r} is not a regular file (a FIFO, device or socket)")
        return capped(f.read(MAX_IMAGE_BYTES + 1), where, name)


def record_key(entry: object, default: str) -> str:
    key = entry.get("id") if isinstance(entry, dict) else None
    if key is None:
        return default
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise Skip(BAD_RECORD, f"id: expected a string or a number, got {type_name(key)}")
    return valid_text(str(key), "id", BAD_RECORD)


def chat_record(index: int, default_key: str, entry: object, kind: str, image_root: str) -> dict:
    """A LLaVA or ShareGPT record with its image files read; a record not in `kind`'s shape is a skip."""
    key, chat = default_key, CHATS[kind]
    try:
        check_entry(entry)
        key = record_key(entry, default_key)
        other = record_format(entry)
        if other != kind:
            found = f"a {other} record" if other else (
                f"no {chat.field!r} field" if isinstance(entry, dict) else type_name(entry))
            raise Skip(UNKNOWN_FORMAT, f"not a {kind} record: {found}")
        names = image_names(entry.get(chat.images), chat.images)
        images = [read_file(image_root, path, where) for where, path in names]
    except Skip as skip:
        return _skipped(index, key, skip)
    except Exception as exc:  # one record is at most one skip, whatever its bytes make a library raise
        return _skipped(index, key, unforeseen(exc))
    return _record(index, key, images, meta={chat.field: entry[chat.field]})


def guarded(read, index: int, key: str, *args) -> dict:
    """`read(index, key, *args)`, or the record's skip if anything in it raises: one record never fails its file."""
    try:
        return read(index, key, *args)
    except Skip as skip:
        return _skipped(index, key, skip)
    except Exception as exc:
        return _skipped(index, key, unforeseen(exc))


def capped_line(f) -> bytes | None:
    """The next line of `f` (to its newline), or None if it is longer than MAX_JSON_BYTES: then it is read past
    in chunks, never held whole."""
    line = f.readline(MAX_JSON_BYTES + 1)
    if len(line) <= MAX_JSON_BYTES or line.endswith(b"\n"):
        return line
    while line and not line.endswith(b"\n"):
        line = f.readline(1 << 20)
    return None


def json_records(shard: InputShard) -> Iterator[tuple[str, object]]:
    """(default key, parsed record) of a shard: its JSON-list entries or its lines (a line that is not JSON
    gives a Skip in place of the record)."""
    if not shard.lines:
        for i, entry in enumerate(shard.entries):
            yield str(shard.start + i), entry
        return
    name = Path(shard.source).name
    with fsspec.open(shard.path, "rb") as f:
        f.seek(shard.start)
        for i in range(shard.count):
            line = capped_line(f)
            try:
                if line is None:
                    raise Skip(BAD_RECORD, f"line: more than {MAX_JSON_BYTES} bytes")
                if not line.strip():
                    raise Skip(BAD_RECORD, "line: empty")
                yield f"{name}:{i}", parse_json(line, "line")
            except Skip as skip:
                yield f"{name}:{i}", skip


def caption_record(index: int, default_key: str, entry: object, image_root: str) -> dict:
    """An image-caption pair with its image file read; the caption goes on as text, as a tar's key.txt does, so
    that an empty or missing one is the converter's counted skip."""
    key = default_key
    try:
        check_entry(entry)
        key = record_key(entry, default_key)
        other = record_format(entry)
        if not isinstance(entry, dict) or other in CHATS:  # an object short of a field is a pair missing it
            raise Skip(UNKNOWN_FORMAT, f"not a captions record: {f'a {other} record' if other else type_name(entry)}")
        caption = entry.get("caption")
        if caption is not None and not isinstance(caption, str):
            raise Skip(BAD_RECORD, f"caption: expected a string, got {type_name(caption)}")
        text = None if caption is None else valid_text(caption, "caption").encode()
        image = entry.get("image")
        if image in (None, ""):  # no field, a CSV row's empty cell, or a row shorter than the header
            raise Skip(IMAGE_MISSING, "image: no file named")
        if not isinstance(image, str):
            raise Skip(BAD_RECORD, f"image: expected a file name, got {type_name(image)}")
        images = [read_file(image_root, path, where) for where, path in image_names(image, "image")]
    except Skip as skip:
        return _skipped(index, key, skip)
    except Exception as exc:  # one record is at most one skip, whatever its bytes make a library raise
        return _skipped(index, key, unforeseen(exc))
    return _record(index, key, images, text=text)


def read_captions(shard: InputShard) -> Iterator[dict]:
    for i, (key, entry) in enumerate(json_records(shard)):
        yield _skipped(i, key, entry) if isinstance(entry, Skip) else caption_record(i, key, entry, shard.image_root)


def read_chat(shard: InputShard) -> Iterator[dict]:
    for i, (key, entry) in enumerate(json_records(shard)):
        if isinstance(entry, Skip):
            yield _skipped(i, key, entry)
        else:
            yield chat_record(i, key, entry, shard.format, shard.image_root)


def imagenet_record(index: int, relpath: str, root: str, name: str) -> dict:
    # Listed from the folder itself, not named by a record: an ImageNet tree of symlinked class folders is common.
    return _record(index, relpath, [read_file(root, relpath, "file", confined=False)], meta={"class_name": name})


def read_imagenet(shard: InputShard) -> Iterator[dict]:
    for i, (relpath, name) in enumerate(shard.entries):
        yield guarded(imagenet_record, i, relpath, shard.image_root, name)


def read_jsonl(shard: InputShard) -> Iterator[dict]:
    """Text documents: the raw line (or a JSON-list entry) goes on; the converter reads its text field."""
    if not shard.lines:
        for i, entry in enumerate(shard.entries):
            yield guarded(entry_document, i, str(shard.start + i), entry)
        return
    with fsspec.open(shard.path, "rb") as f:
        f.seek(shard.start)
        for i in range(shard.count):
            line, key = capped_line(f), f"{Path(shard.source).name}:{i}"
            if line is None:
                yield _skipped(i, key, Skip(TOO_LONG, f"a line of more than {MAX_JSON_BYTES} bytes"))
            else:
                yield _record(i, key, text=line.rstrip(b"\r\n"))


def entry_document(index: int, key: str, entry: object) -> dict:
    """A JSON-list entry as the document line it stands for."""
    check_entry(entry)
    return _record(index, key, text=json.dumps(entry).encode())


def read_failed(shard: InputShard) -> Iterator[dict]:
    raise InputFault(shard.failure)


READERS = {"wds": read_wds, "llava": read_chat, "sharegpt": read_chat, "imagenet": read_imagenet,
           "jsonl": read_jsonl, "captions": read_captions, "failed": read_failed}


def read_shard_records(shard: InputShard) -> list[dict]:
    """All raw records of one input shard, each knowing the shard's total (how the driver knows it is done).
    A file that fails adds one FILE_FAILED record with the reason, after the records read before it failed."""
    records: list[dict] = []
    try:
        for record in READERS[shard.format](shard):  # not list(): the records before a fault are kept
            records.append(record)
    except Exception as exc:  # cannot open or read the file (to its end), whatever the filesystem raises
        reason = str(exc) if isinstance(exc, InputFault) else fault(exc)
        records.append(_record(len(records), "", error=FILE_FAILED, detail=reason))
    if not records:
        records = [_record(-1, "", error=EMPTY_SHARD)]
    total = 0 if records[0]["error"] == EMPTY_SHARD else len(records)
    return [{**r, "shard": shard.index, "total": total} for r in records]
