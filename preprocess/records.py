"""Raw records -> output rows: decoding, the Janus transforms and tokenisation, with every failure a named skip.

Pure functions, no Ray: the job runs them inside `map_batches`. A raw record is a `RawRecord` dict
(what a reader pulled out of an input shard); an output row is a dict in OUT_SCHEMA (a sample in
SAMPLE_SCHEMA's columns plus the bookkeeping that lets the driver reassemble shards). A record that
cannot become a sample becomes one row with `skip` set to a reason, so that every input row is counted.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TypedDict

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError
from transformers import PreTrainedTokenizerBase

from model.chat_format import (
    JANUS_SYSTEM_PROMPT,
    NUM_IMAGE_TOKENS,
    Turn,
    encode_text,
    generation_prompt_ids,
    text_sample,
    understanding_sample,
)
from model.images import (
    IMAGE_SIZE,
    draft_for_transform,
    encode_image,
    generation_image,
    open_encoded,
    to_rgb,
    understanding_image,
)
from model.sample import GENERATION, SAMPLE_SCHEMA, TEXT, UNDERSTANDING, Sample
from model.tokenizer import load_tokenizer

# Skip reasons (the manifest counts rows per reason). SKIP_REASONS below says what each one means.
IMAGE_MISSING = "image_missing"
IMAGE_EMPTY = "image_empty"
IMAGE_UNREADABLE = "image_unreadable"  # not one of the accepted formats (JPEG, PNG, WebP, GIF, BMP, TIFF)
IMAGE_CORRUPT = "image_corrupt"  # a known format that fails to decode (truncated)
IMAGE_TOO_LARGE = "image_too_large"
IMAGE_TOO_SMALL = "image_too_small"
IMAGE_PATH_UNSAFE = "image_path_unsafe"
TEXT_MISSING = "text_missing"
TEXT_EMPTY = "text_empty"
TEXT_NOT_UTF8 = "text_not_utf8"
TOO_LONG = "too_long"
BAD_RECORD = "bad_record"
UNKNOWN_FORMAT = "unknown_format"
TAR_TRUNCATED = "tar_truncated"
INPUT_LOST = "input_lost"
DUPLICATE_MEMBER = "duplicate_member"
MEMBER_NOT_FILE = "member_not_file"

SKIP_REASONS = {
    IMAGE_MISSING: "no image: the sample names none, or its file or tar member is absent or unreadable",
    IMAGE_EMPTY: "the image file is 0 bytes",
    IMAGE_UNREADABLE: "not one of the accepted formats (JPEG, PNG, WebP, GIF, BMP, TIFF): random bytes, or an "
                      "EPS/PDF/... never opened",
    IMAGE_CORRUPT: "an accepted image format that fails to decode (e.g. a truncated JPEG)",
    IMAGE_TOO_LARGE: "more pixels than --max-pixels, or more bytes than an image may hold (MAX_IMAGE_BYTES)",
    IMAGE_TOO_SMALL: "a side shorter than --min-image-size",
    IMAGE_PATH_UNSAFE: "a LLaVA/ShareGPT/captions image path that is absolute or climbs out of --image-root (never "
                       "read)",
    TEXT_MISSING: "no caption / no text field",
    TEXT_EMPTY: "the caption or text is blank",
    TEXT_NOT_UTF8: "the caption or line is not UTF-8",
    TOO_LONG: "the sample is longer than --context tokens, or its text longer in bytes than a sample or document may "
              "be before it is tokenised",
    BAD_RECORD: "a field of the record has the wrong type or value (JSON too deep or too large included; the detail "
                "names the field), or converting it raised an error nobody foresaw (the detail names it)",
    UNKNOWN_FORMAT: "a record that is not in its file's format (e.g. no `conversations` in LLaVA data), or not in "
                    "one its task reads (a text document for understanding/generation, an image record for text)",
    TAR_TRUNCATED: "the record where a tar breaks (cut, corrupt): it may lack members; the file is in files_failed",
    INPUT_LOST: "a record of an input file whose task failed every try (its worker died or was killed for memory): "
                "never converted; the file is in files_failed",
    DUPLICATE_MEMBER: "a tar holds a member name (key.ext) twice: which copy is meant is unknown",
    MEMBER_NOT_FILE: "a tar member of the sample is a symlink, hard link or device, not a file",
}

# Caps: what one record or file may cost a task, so that one input is at most one skip or one failed file, in
# bounded memory and time. Each is checked before the work it bounds (a read, a parse, a tokenisation).
MAX_JSON_BYTES = 16 << 20  # one JSON record: a line, a tar sample's key.json (a JSON-list file is read whole)
MAX_JSON_DEPTH = 64  # nesting of one JSON record; deeper is never real data, and json recurses per level
MAX_IMAGE_BYTES = 64 << 20  # one image file or tar member; the pixels are capped apart (--max-pixels)
MAX_MEMBER_BYTES = 64 << 20  # one tar member of any kind: larger ones are passed over unread
MAX_RECORD_BYTES = 128 << 20  # all members of one tar sample together
# The text of one understanding or generation sample (a caption, or a conversation's turns), before tokenising:
# --context 4096 tokens hold ~20 KB of text; a tokenizer costs ~270 bytes of memory per byte of text.
MAX_SAMPLE_TEXT_BYTES = 256 << 10
MAX_DOCUMENT_BYTES = 2 << 20  # one text document before tokenising (it is cut into context-sized pieces after)

# An input shard with no records still needs one row so that the driver learns it is finished.
EMPTY_SHARD = "__empty_shard__"
# A record that stands for an input file that could not be read (to its end): the row carries the reason to the
# driver, which lists it in the manifest's files_failed instead of counting it as a row.
FILE_FAILED = "__file_failed__"

# Where an image goes in a LLaVA or ShareGPT turn, as both write it. Kept as the marker (never rewritten to Janus's
# <image_placeholder>), so that any other text in a turn, a quoted <image_placeholder> included, stays text.
IMAGE_MARKER = "<image>"

DEFAULT_INSTRUCTIONS = (
    "Describe this image.",
    "What is in this image?",
    "Describe the picture in detail.",
    "Write a short caption for this image.",
    "What does this picture show?",
)

class RawRecord(TypedDict, total=False):
    """What a reader (preprocess/sources.py) pulls out of an input shard, handed straight to the converter."""

    shard: int
    index: int  # position of the record in its input shard
    total: int  # records in the input shard
    key: str
    images: list[bytes | None]
    text: bytes | None  # raw caption / JSONL line bytes: UTF-8 is checked when converting
    meta: str | None  # JSON: conversations, class name, img2dataset json, ...
    error: str | None  # a skip reason found while reading (e.g. a missing image file)
    detail: str | None  # what exactly, e.g. which field was wrong

OUT_SCHEMA = pa.schema(
    [f.with_nullable(True) for f in SAMPLE_SCHEMA.remove_metadata()]
    + [
        pa.field("shard", pa.int64()),
        pa.field("index", pa.int64()),
        pa.field("part", pa.int64()),  # a long text document becomes several rows
        pa.field("parts", pa.int64()),
        pa.field("total", pa.int64()),
        pa.field("skip", pa.string()),
        pa.field("detail", pa.string()),  # why, for the log
        pa.field("gen_pixels", pa.binary()),  # generation: 384x384x3 uint8, replaced by VQ ids in the actor
        pa.field("caption", pa.string()),
    ]
)


@dataclass(frozen=True)
class ConvertConfig:
    """Everything that decides what a record becomes; part of the manifest's settings."""

    task: str
    tokenizer: str
    context: int = 4096
    # Lossless by default: JPEG q98 4:4:4 measured 44.0 dB on skimage's hubble_deep_field, under the 45 dB contract.
    image_format: str = "webp"
    max_pixels: int = 89_478_485  # PIL's own decompression-bomb limit
    min_image_size: int = 32
    instructions: tuple[str, ...] = DEFAULT_INSTRUCTIONS
    system_prompt: str | None = JANUS_SYSTEM_PROMPT
    text_field: str = "text"
    num_image_tokens: int = NUM_IMAGE_TOKENS


class Skip(Exception):
    """A record that cannot become a sample; `reason` is what the manifest counts."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


# The job converts one shard's records on several threads, and they share the tokenizer: transformers' fast
# tokenizer keeps `split_special_tokens` as state on the Rust tokenizer, set by each call, so two threads encoding
# at once can each encode with the other's setting (seen: ~3% of samples with a format token spelled out).
TOKENIZER_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def cached_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """One tokenizer per worker process (Ray reuses workers across tasks); converters take it by locked_tokenizer."""
    return load_tokenizer(path)


@contextmanager
def locked_tokenizer(path: str) -> Iterator[PreTrainedTokenizerBase]:
    """The worker's tokenizer, held by this thread alone until the block ends (TOKENIZER_LOCK)."""
    with TOKENIZER_LOCK:
        yield cached_tokenizer(path)


def open_image(data: bytes | None, cfg: ConvertConfig) -> Image.Image:
    """Decoded 8-bit RGB, EXIF applied; size limits are checked from the header, before decoding pixels."""
    if data is None:
        raise Skip(IMAGE_MISSING)
    if len(data) == 0:
        raise Skip(IMAGE_EMPTY)
    try:
        with warnings.catch_warnings():
            # We enforce our own pixel limit below; PIL's warning between 1x and 2x its limit is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = open_encoded(data)  # JPEG, PNG, WebP, GIF, BMP, TIFF: an EPS is never handed to Ghostscript
    except Image.DecompressionBombError as exc:
        raise Skip(IMAGE_TOO_LARGE, str(exc)) from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise Skip(IMAGE_UNREADABLE, str(exc)) from exc
    width, height = image.size
    if width * height > cfg.max_pixels:
        raise Skip(IMAGE_TOO_LARGE, f"{width}x{height}")
    if min(width, height) < cfg.min_image_size:
        raise Skip(IMAGE_TOO_SMALL, f"{width}x{height}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            draft_for_transform(image).load()
            return to_rgb(image)
    except Exception as exc:  # PIL raises many types for broken files; any of them is a corrupt image
        raise Skip(IMAGE_CORRUPT, f"{type(exc).__name__}: {exc}") from exc


def decode_text(data: bytes | None, limit: int = MAX_SAMPLE_TEXT_BYTES) -> str:
    """UTF-8 text of at most `limit` bytes (checked before decoding: nothing larger is ever tokenised)."""
    if data is None:
        raise Skip(TEXT_MISSING)
    if len(data) > limit:
        raise Skip(TOO_LONG, f"{len(data)} bytes of text, more than the {limit} a sample may hold")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Skip(TEXT_NOT_UTF8, str(exc)) from exc
    if not text.strip():
        raise Skip(TEXT_EMPTY)
    return text


def valid_text(value: str, where: str, reason: str = TEXT_NOT_UTF8) -> str:
    """`value` if it can be written as UTF-8. JSON's `\\ud800` and tarfile's undecodable name bytes give strings
    holding lone surrogates, which a tokenizer (TypeError) or Arrow (on writing) fails on far from their record."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Skip(reason, f"{where}: not valid Unicode (a lone surrogate at character {exc.start})") from None
    return value


def printable(text: str) -> str:
    """`text` as Arrow can store it: a lone surrogate spelled as its escape (keys and details of skipped rows)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def nesting(value: object) -> int:
    """How deeply a parsed JSON value nests, walked without recursion (code that recurses over it, json.dumps
    included, would run out of stack where json.loads did not)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(data: bytes | str, where: str) -> object:
    """One JSON record, bounded: at most MAX_JSON_BYTES, nested at most MAX_JSON_DEPTH deep, any parse failure a
    BAD_RECORD naming `where`. json.loads raises plain ValueError (not JSONDecodeError) on an integer of over 4300
    digits, and RecursionError on nesting near Python's recursion limit (it recurses per level)."""
    size = len(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
    if size > MAX_JSON_BYTES:
        raise Skip(BAD_RECORD, f"{where}: {size} bytes of JSON, more than {MAX_JSON_BYTES}")
    try:
        value = json.loads(data)
    except RecursionError:
        raise Skip(BAD_RECORD, f"{where}: JSON nested deeper than Python's recursion limit") from None
    except ValueError as exc:
        raise Skip(BAD_RECORD, f"{where}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    depth = nesting(value)
    if depth > MAX_JSON_DEPTH:
        raise Skip(BAD_RECORD, f"{where}: JSON nested {depth} deep, more than {MAX_JSON_DEPTH}")
    return value


def record_caption(record: dict) -> str:
    """The caption: `key.txt`, else the `caption`/`text` of `key.json` (img2dataset writes both)."""
    if record.get("text") is not None:
        return decode_text(record["text"]).strip()
    meta = json.loads(record["meta"]) if record.get("meta") else {}
    for name in ("caption", "text", "class_name"):
        if isinstance(meta.get(name), str):
            return decode_text(valid_text(meta[name], f"json.{name}").encode()).strip()
    raise Skip(TEXT_MISSING)


def pick_instruction(key: str, instructions: tuple[str, ...]) -> str:
    """A deterministic choice per key (hash, not random), so reruns give identical shards."""
    digest = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return instructions[digest % len(instructions)]


def type_name(value: object) -> str:
    """JSON's name for a value's type, for details that name what a field held."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class ChatFormat:
    """How one chat format spells a record: LLaVA `conversations` (from/value, human/gpt) and `image`, or
    ShareGPT/LLaMA-Factory `messages` (role/content, user/assistant, an optional first system message) and
    `images`. The conversation field is what tells the formats apart."""

    name: str
    field: str
    role: str
    text: str
    roles: dict
    images: str


CHAT_FORMATS = (
    ChatFormat("llava", "conversations", "from", "value",
               {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}, "image"),
    ChatFormat("sharegpt", "messages", "role", "content",
               {"user": "user", "assistant": "assistant", "system": "system"}, "images"),
)


def chat_turns(messages: object, chat: ChatFormat) -> tuple[str | None, list[Turn]]:
    """(system prompt or None, Turns with the data's IMAGE_MARKERs); a wrong field is a skip that names it."""
    if not isinstance(messages, list):
        raise Skip(BAD_RECORD, f"{chat.field}: expected a list, got {type_name(messages)}")
    system, turns = None, []
    for j, message in enumerate(messages):
        where = f"{chat.field}[{j}]"
        if not isinstance(message, dict):
            raise Skip(BAD_RECORD, f"{where}: expected an object, got {type_name(message)}")
        for name in (chat.role, chat.text):
            if name not in message:
                raise Skip(BAD_RECORD, f"{where}.{name}: missing")
        role, text = chat.roles.get(str(message[chat.role])), message[chat.text]
        if role is None:
            raise Skip(BAD_RECORD, f"{where}.{chat.role}: {str(message[chat.role])[:40]!r} is not one of "
                                   f"{sorted(chat.roles)}")
        if role == "system" and j > 0:
            raise Skip(BAD_RECORD, f"{where}.{chat.role}: a system message comes first or not at all")
        if not isinstance(text, str):
            raise Skip(BAD_RECORD, f"{where}.{chat.text}: expected a string, got {type_name(text)}")
        valid_text(text, f"{where}.{chat.text}")
        if role == "system":
            system = text
        else:
            turns.append(Turn(role, text))
    return system, turns


def understanding_turns(record: dict, n_images: int, cfg: ConvertConfig) -> tuple[str | None, list[Turn]]:
    """(system prompt, turns): the record's own conversation, or an instruction answered by its caption."""
    meta = json.loads(record["meta"]) if record.get("meta") else {}
    chat = next((c for c in CHAT_FORMATS if c.field in meta), None)
    if chat is not None:
        system, turns = chat_turns(meta[chat.field], chat)
        size = sum(len(t.text.encode()) for t in turns) + len((system or "").encode())
        if size > MAX_SAMPLE_TEXT_BYTES:  # before tokenising: a 10 MB answer costs GBs and a minute to encode
            raise Skip(TOO_LONG, f"{size} bytes of conversation, more than the {MAX_SAMPLE_TEXT_BYTES} a sample may "
                                 "hold")
        placed = sum(t.text.count(IMAGE_MARKER) for t in turns if t.role == "user")
        if placed == 0 and n_images and turns and turns[0].role == "user":
            # LLaVA data sometimes omits the <image> marker: the images go before the first question.
            turns[0] = Turn("user", IMAGE_MARKER * n_images + "\n" + turns[0].text)
        return (cfg.system_prompt if system is None else system), turns
    caption = record_caption(record)  # caption-only data: ask an instruction, answer with the caption
    instruction = pick_instruction(record["key"], cfg.instructions)
    return cfg.system_prompt, [Turn("user", IMAGE_MARKER * n_images + "\n" + instruction),
                               Turn("assistant", caption)]


def convert_understanding(record: dict, cfg: ConvertConfig) -> list[dict]:
    images = [encode_image(understanding_image(open_image(b, cfg)), cfg.image_format) for b in record["images"]]
    system, turns = understanding_turns(record, len(images), cfg)
    try:
        with locked_tokenizer(cfg.tokenizer) as tokenizer:
            sample = understanding_sample(tokenizer, turns, images, system=system,
                                          num_image_tokens=cfg.num_image_tokens, key=record["key"],
                                          image_marker=IMAGE_MARKER)
    except (ValueError, TypeError) as exc:  # <image> markers that do not match the images; text the tokenizer
        raise Skip(BAD_RECORD, str(exc)) from exc  # cannot keep plain (a TypeError: strings it cannot take)
    if len(sample.input_ids) > cfg.context:
        raise Skip(TOO_LONG, f"{len(sample.input_ids)} tokens")
    return [sample.to_row()]


def convert_generation(record: dict, cfg: ConvertConfig) -> list[dict]:
    """The transformed image goes on as raw pixels; the VQ actor turns it into ids and builds the sample."""
    if len(record["images"]) != 1:
        raise Skip(BAD_RECORD, f"{len(record['images'])} images; generation takes one")
    caption = record_caption(record)
    image = generation_image(open_image(record["images"][0], cfg))
    try:
        with locked_tokenizer(cfg.tokenizer) as tokenizer:
            prompt = generation_prompt_ids(tokenizer, caption)
    except (ValueError, TypeError) as exc:  # a control token's string the tokenizer encodes as that token even in
        raise Skip(BAD_RECORD, f"caption: {exc}") from exc  # plain text; a string it cannot take (TypeError)
    if len(prompt) + cfg.num_image_tokens + 1 > cfg.context:  # + <end_of_image>
        raise Skip(TOO_LONG, f"{len(prompt)} prompt tokens")
    assert image.size == (IMAGE_SIZE, IMAGE_SIZE)
    return [{"key": record["key"], "task": GENERATION, "gen_pixels": np.asarray(image, dtype=np.uint8).tobytes(),
             "caption": caption}]


def split_document(tokenizer: PreTrainedTokenizerBase, text: str, context: int, key: str) -> list[Sample]:
    """Context-sized pieces of one document, cut at token boundaries; only the last piece ends in EOS."""
    offsets = encode_text(tokenizer, text)[1]  # as text_sample encodes each piece: special strings spelled out
    budget = context - 2  # BOS and EOS
    pieces: list[Sample] = []
    start = 0
    while start < len(offsets):
        end = min(len(offsets), start + budget)
        for _ in range(64):  # re-tokenising a piece can differ at its edges: shrink until it fits
            last = end == len(offsets)
            piece = text[offsets[start][0]:(len(text) if last else offsets[end][0])]
            sample = text_sample(tokenizer, piece, add_eos=last, key=f"{key}#{len(pieces)}")
            if len(sample.input_ids) <= context:
                break
            end = max(start + 1, end - max(1, (end - start) // 100))
        else:
            raise Skip(TOO_LONG, "could not cut the document into pieces that fit the context")
        pieces.append(sample)
        start = end
    return pieces


def convert_text(record: dict, cfg: ConvertConfig) -> list[dict]:
    line = decode_text(record["text"], limit=MAX_JSON_BYTES)
    obj = parse_json(line, "line")
    text = obj.get(cfg.text_field) if isinstance(obj, dict) else None
    if not isinstance(text, str):
        raise Skip(TEXT_MISSING, f"no string field {cfg.text_field!r}")
    if not text.strip():
        raise Skip(TEXT_EMPTY)
    size = len(valid_text(text, cfg.text_field).encode())
    if size > MAX_DOCUMENT_BYTES:  # before tokenising: a tokenizer holds ~270 bytes per byte of text
        raise Skip(TOO_LONG, f"a document of {size} bytes, more than {MAX_DOCUMENT_BYTES}")
    try:
        with locked_tokenizer(cfg.tokenizer) as tokenizer:
            pieces = split_document(tokenizer, text, cfg.context, record["key"])
    except (ValueError, TypeError) as exc:  # a control token's string the tokenizer encodes as that token even in
        raise Skip(BAD_RECORD, f"{cfg.text_field}: {exc}") from exc  # plain text; a string it cannot take
    return [s.to_row() for s in pieces]


CONVERTERS = {UNDERSTANDING: convert_understanding, GENERATION: convert_generation, TEXT: convert_text}


def is_document(record: dict) -> bool:
    """A line of a text corpus: text and nothing else (image records carry images, chat records a conversation)."""
    return not record["images"] and not record.get("meta")


def check_task_reads(record: dict, task: str) -> None:
    """A record of a shape its task does not read is a skip: a JSON line is never taken for a caption (it would
    become an understanding answer with no image), nor a caption for a document."""
    if task == TEXT and not is_document(record):
        raise Skip(UNKNOWN_FORMAT, "an image or chat record; the text task reads JSON lines of documents")
    if task != TEXT and is_document(record):
        raise Skip(UNKNOWN_FORMAT, f"a text document; the {task} task reads images with captions or conversations")


def convert_record(record: dict, cfg: ConvertConfig) -> list[dict]:
    """Output rows for one raw record: its samples, or one row naming why it was skipped."""
    bookkeeping = {"shard": record["shard"], "index": record["index"], "total": record["total"]}
    if record.get("error") == EMPTY_SHARD:
        return [{**bookkeeping, "key": "", "task": cfg.task, "part": 0, "parts": 0, "skip": EMPTY_SHARD}]
    if record.get("error") == FILE_FAILED:
        return [{**bookkeeping, "key": "", "task": cfg.task, "part": 0, "parts": 1, "skip": FILE_FAILED,
                 "detail": printable(record["detail"] or "")}]
    try:
        if record.get("error"):  # found while reading: a missing image file, a field of the wrong type, ...
            raise Skip(record["error"], record.get("detail") or "")
        valid_text(record["key"], "key", BAD_RECORD)  # a file or member name: it becomes the sample's key
        check_task_reads(record, cfg.task)
        rows = CONVERTERS[cfg.task](record, cfg)
    except Skip as skip:
        rows = [skipped_row(record["key"], cfg.task, skip)]
    except Exception as exc:  # one record is at most one skip, whatever its bytes make a library raise
        rows = [skipped_row(record["key"], cfg.task, unforeseen(exc))]
    return [{**row, **bookkeeping, "part": i, "parts": len(rows)} for i, row in enumerate(rows)]


def unforeseen(exc: BaseException) -> Skip:
    """The skip for an error no check foresaw: the record's fault until shown otherwise, named so it can be found."""
    return Skip(BAD_RECORD, f"unexpected {type(exc).__name__}: {exc}")


def skipped_row(key: str, task: str, skip: Skip) -> dict:
    return {"key": printable(key), "task": task, "skip": skip.reason, "detail": printable(str(skip)[:200])}
