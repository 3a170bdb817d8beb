"""One record is at most one skip, one input file at most one failed input, in bounded memory and time (issue #27):
strings that are not valid Unicode, JSON too deep or too large, records that make a library raise what nobody
named, images that are not regular files under their root, tar members and texts too large to read or tokenise,
inputs named twice, shards whose task failed every try.

In-process: what a Ray task runs (readers, converters) and what the driver runs (the shard assembler), on real tars,
real JSON files and the photographs. Caps are lowered with monkeypatch where a test would otherwise need gigabytes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import tarfile
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pytest

import preprocess.records as records
import preprocess.sources as sources
from preprocess.job import ShardAssembler
from preprocess.records import (
    BAD_RECORD,
    FILE_FAILED,
    IMAGE_PATH_UNSAFE,
    IMAGE_TOO_LARGE,
    INPUT_LOST,
    OUT_SCHEMA,
    TEXT_NOT_UTF8,
    TOO_LONG,
    ConvertConfig,
    convert_record,
)
from preprocess.sources import InputShard, list_shards, read_shard_records
from tests.support import CAPTION, CONVERSATION, samples, tar_bytes


def read_all(inputs: list[str], image_root: str = "") -> list[dict]:
    """What the job's read tasks produce for these inputs, shard after shard."""
    return [r for shard in list_shards(inputs, "auto", 100, image_root) for r in read_shard_records(shard)]


def converted(inputs: list[str], cfg: ConvertConfig, image_root: str = "") -> dict[str, dict]:
    """key -> the first output row of each record, after checking that all rows make one Arrow table (what a task
    hands Ray: a string Arrow cannot store fails the task there)."""
    rows = [row for record in read_all(inputs, image_root) for row in convert_record(record, cfg)]
    pa.Table.from_pylist(rows, schema=OUT_SCHEMA)
    return {row["key"]: {"skip": None, "detail": None, **row} for row in rows if row["part"] == 0}


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (rather than hang the suite) if the block takes longer: a FIFO blocks its reader for ever."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def und_cfg(tokenizer_dir) -> ConvertConfig:
    return ConvertConfig(task="understanding", tokenizer=str(tokenizer_dir), system_prompt=None)


def test_strings_that_are_not_unicode_are_one_skip_each(tmp_path, jpeg, photos, und_cfg, tokenizer_dir):
    """Before: a lone surrogate in a caption (UnicodeEncodeError), a member name that is not UTF-8 (Arrow, on
    writing the key) and a surrogate in a LLaVA `id` (Arrow) or answer (the tokenizer's TypeError: only ValueError
    was caught) each raised out of the task: the job died with exit 1 and no manifest."""
    members = {**samples(["good"], jpeg), "surrogate.jpg": jpeg, "surrogate.json": b'{"caption": "\\ud800"}',
               "name\udcff.jpg": jpeg, "name\udcff.txt": CAPTION.encode()}  # tarfile writes the byte 0xff
    (tmp_path / "strings.tar").write_bytes(tar_bytes(members))
    photos["chelsea.png"].save(tmp_path / "chelsea.png")
    llava = [{"id": "\ud800", "image": "chelsea.png", "conversations": CONVERSATION},
             {"id": "answer", "image": "chelsea.png",
              "conversations": [CONVERSATION[0], {"from": "gpt", "value": "A \udc80 cat."}]},
             {"id": "fine", "image": "chelsea.png", "conversations": CONVERSATION}]
    (tmp_path / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in llava))
    rows = converted([str(tmp_path / "strings.tar"), str(tmp_path / "llava.jsonl")], und_cfg, str(tmp_path))
    assert rows["good"]["skip"] is None and rows["fine"]["skip"] is None
    assert rows["surrogate"]["skip"] == TEXT_NOT_UTF8 and "json.caption" in rows["surrogate"]["detail"]
    assert rows["name\\udcff"]["skip"] == BAD_RECORD and "member name" in rows["name\\udcff"]["detail"]
    assert rows["llava.jsonl#0:0"]["skip"] == BAD_RECORD and "id:" in rows["llava.jsonl#0:0"]["detail"]
    assert rows["answer"]["skip"] == TEXT_NOT_UTF8 and "conversations[1].value" in rows["answer"]["detail"]

    text_cfg = ConvertConfig(task="text", tokenizer=str(tokenizer_dir))
    (tmp_path / "docs.jsonl").write_text('{"text": "\\ud800"}\n{"text": "fine"}\n')
    rows = converted([str(tmp_path / "docs.jsonl")], text_cfg)
    assert rows["docs.jsonl#0:0"]["skip"] == TEXT_NOT_UTF8 and rows["docs.jsonl#0:1#0"]["skip"] is None


def test_json_too_deep_or_too_large_is_one_skip(tmp_path, jpeg, photos, und_cfg, tokenizer_dir):
    """Before: a 5,000-digit integer raised a plain ValueError (only JSONDecodeError was caught) and JSON nested
    100,000 deep a RecursionError, out of the task; a deep key.json or LLaVA line failed its whole file and the
    records after it were neither read nor counted (issue #27, defects 6 and 8)."""
    deep = "[" * 100_000 + "]" * 100_000
    shallow_enough_for_json = "[" * 500 + "]" * 500  # parsed, but deeper than MAX_JSON_DEPTH
    text_cfg = ConvertConfig(task="text", tokenizer=str(tokenizer_dir))
    (tmp_path / "docs.jsonl").write_text(f'{{"text": "a"}}\n{{"text": {"9" * 5000}}}\n{deep}\n{{"text": "b"}}\n'
                                         f'{shallow_enough_for_json}\n')
    rows = converted([str(tmp_path / "docs.jsonl")], text_cfg)
    assert [rows[f"docs.jsonl#0:{i}"]["skip"] for i in (1, 2, 4)] == [BAD_RECORD, BAD_RECORD, BAD_RECORD]
    assert "nested 500 deep" in rows["docs.jsonl#0:4"]["detail"]
    assert "digits" in rows["docs.jsonl#0:1"]["detail"] and "nested deeper" in rows["docs.jsonl#0:2"]["detail"]
    assert rows["docs.jsonl#0:0#0"]["skip"] is None and rows["docs.jsonl#0:3#0"]["skip"] is None

    members = {**samples(["before"], jpeg), "deep.jpg": jpeg, "deep.json": deep.encode(),
               **samples(["after"], jpeg)}
    (tmp_path / "deep.tar").write_bytes(tar_bytes(members))
    photos["chelsea.png"].save(tmp_path / "chelsea.png")
    (tmp_path / "llava.jsonl").write_text(
        json.dumps({"id": "l0", "image": "chelsea.png", "conversations": CONVERSATION}) + f"\n{deep}\n"
        + json.dumps({"id": "l2", "image": "chelsea.png", "conversations": CONVERSATION}) + "\n")
    records_read = read_all([str(tmp_path / "deep.tar"), str(tmp_path / "llava.jsonl")], str(tmp_path))
    assert FILE_FAILED not in [r["error"] for r in records_read]
    rows = converted([str(tmp_path / "deep.tar"), str(tmp_path / "llava.jsonl")], und_cfg, str(tmp_path))
    assert {k: r["skip"] for k, r in rows.items()} == {"before": None, "deep": BAD_RECORD, "after": None,
                                                       "l0": None, "llava.jsonl#0:1": BAD_RECORD, "l2": None}


class Unforeseen(Exception):
    """An error type no code in the project names."""


def test_an_error_nobody_named_is_one_skip(tmp_path, jpeg, photos, monkeypatch, und_cfg):
    """Any exception while reading or converting a record is that record's skip, named, and the file goes on.
    Before: it left the task (converting) or failed the file with the records after it uncounted (reading)."""
    (tmp_path / "a.tar").write_bytes(tar_bytes(samples(["k0", "k1", "k2"], jpeg)))
    real_open, real_record = records.open_image, sources.wds_record
    calls = []

    def open_image(data, cfg):  # the second record's image (k1): k2 never reaches the converter
        calls.append(1)
        if len(calls) == 2:
            raise Unforeseen("from the decoder")
        return real_open(data, cfg)

    def wds_record(index, key, sample):
        if key == "k2":
            raise Unforeseen("from the reader")
        return real_record(index, key, sample)

    monkeypatch.setattr(records, "open_image", open_image)
    monkeypatch.setattr(sources, "wds_record", wds_record)
    rows = converted([str(tmp_path / "a.tar")], und_cfg)
    assert rows["k0"]["skip"] is None
    assert rows["k1"]["skip"] == BAD_RECORD and "unexpected Unforeseen: from the decoder" in rows["k1"]["detail"]
    assert rows["k2"]["skip"] == BAD_RECORD and "unexpected Unforeseen: from the reader" in rows["k2"]["detail"]


def test_llava_images_are_regular_files_under_the_root(tmp_path, photos, und_cfg, monkeypatch):
    """Before: a FIFO blocked the task for ever, a symlink to /dev/zero filled its memory until it was killed (and
    Ray retried it without end), a symlink inside the root was followed out of it, and a file was read whole
    whatever its size (issue #27, defect 7)."""
    root = tmp_path / "images"
    root.mkdir()
    photos["chelsea.png"].save(root / "chelsea.png")
    photos["astronaut.png"].save(tmp_path / "secret.png")
    os.mkfifo(root / "fifo.png")
    (root / "zero.png").symlink_to("/dev/zero")
    (root / "out.png").symlink_to(tmp_path / "secret.png")
    (root / "in.png").symlink_to(root / "chelsea.png")  # a link that stays inside is fine
    (root / "big.png").write_bytes((root / "chelsea.png").read_bytes() + bytes(4096))
    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", (root / "chelsea.png").stat().st_size + 1024)
    names = ["chelsea", "fifo", "zero", "out", "in", "big"]
    (tmp_path / "llava.json").write_text(json.dumps(
        [{"id": n, "image": f"{n}.png", "conversations": CONVERSATION} for n in names]))
    with deadline(60):
        rows = converted([str(tmp_path / "llava.json")], und_cfg, str(root))
    assert {n: rows[n]["skip"] for n in names} == {
        "chelsea": None, "fifo": BAD_RECORD, "zero": IMAGE_PATH_UNSAFE, "out": IMAGE_PATH_UNSAFE, "in": None,
        "big": IMAGE_TOO_LARGE}
    assert "not a regular file" in rows["fifo"]["detail"]


def test_a_huge_tar_member_is_passed_over_unread(tmp_path, jpeg, monkeypatch, und_cfg):
    """A .tar.gz of a few kB may unpack to a member of gigabytes: it is a skip and is never held. Before: every
    member was read whole (a 9 MB .tar.gz with one 2 GiB member peaked at 6.6 GB). Here the caps are lowered and
    the member is 32 MiB; the other records of the tar are read."""
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 1 << 20)
    monkeypatch.setattr(sources, "MAX_RECORD_BYTES", len(jpeg) * 3 // 2)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in samples(["k0"], jpeg).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("huge.jpg")
        info.size = 32 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
        for name, data in [("huge.txt", b"a caption"), ("pair.jpg", jpeg), ("pair.webp", jpeg),  # 2 x jpeg: too much
                           *samples(["k1"], jpeg).items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "huge.tar.gz"
    path.write_bytes(buffer.getvalue())
    assert path.stat().st_size < 200_000
    tracemalloc.start()
    try:
        rows = converted([str(path)], und_cfg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert {k: r["skip"] for k, r in rows.items()} == {"k0": None, "huge": IMAGE_TOO_LARGE, "pair": IMAGE_TOO_LARGE,
                                                       "k1": None}
    assert peak < 16 << 20, peak


def test_texts_too_long_to_tokenise_are_skipped_before_the_tokenizer(tmp_path, jpeg, tokenizer_dir, monkeypatch,
                                                                    und_cfg):
    """Before: a 10 MB caption was tokenised whole before any cap (2.7 GB, 50 s), and so was a document of any size.
    Here the tokenizer is not allowed near them: the caps come first."""
    (tmp_path / "long.tar").write_bytes(tar_bytes({"long.jpg": jpeg, "long.txt": b"word " * (2 << 20)}))
    (tmp_path / "docs.jsonl").write_text(json.dumps({"text": "word " * 1000}) + "\n")
    monkeypatch.setattr(records, "MAX_DOCUMENT_BYTES", 4000)

    @contextlib.contextmanager
    def no_tokenizer(path):
        raise AssertionError("tokenised")
        yield

    monkeypatch.setattr(records, "locked_tokenizer", no_tokenizer)
    assert converted([str(tmp_path / "long.tar")], und_cfg)["long"]["skip"] == TOO_LONG
    text_cfg = ConvertConfig(task="text", tokenizer=str(tokenizer_dir))
    assert converted([str(tmp_path / "docs.jsonl")], text_cfg)["docs.jsonl#0:0"]["skip"] == TOO_LONG


def test_an_input_named_several_ways_is_read_once(tmp_path, monkeypatch):
    """Before: `a.jsonl`, `./a.jsonl` and `d/../a.jsonl` were three inputs, each read (and counted) once."""
    (tmp_path / "d").mkdir()
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    monkeypatch.chdir(tmp_path)
    shards = list_shards(["a.jsonl", "./a.jsonl", "d/../a.jsonl", ".//a.jsonl", "link.jsonl"], "auto", 10)
    assert [s.source for s in shards] == ["a.jsonl#0"]


def test_a_shard_whose_task_failed_every_try_is_a_failed_file_with_its_records_counted(tmp_path):
    """Ray Data drops the block of a task that failed every try (max_errored_blocks); the driver then lists the
    input in files_failed and counts every record it is known to hold, those that arrived written or skipped and
    the rest as input_lost, so that rows in = written + skipped. Before: Ray retried such a task without end, and
    a dropped block ended the job."""
    (tmp_path / ".progress").mkdir()
    lines = InputShard(0, "jsonl", "docs.jsonl#0", count=5, lines=True)
    tar = InputShard(1, "wds", "never.tar")
    assembler = ShardAssembler(tmp_path, [lines, tar], "hash", 2, 0)
    arrived = [{"key": "docs.jsonl#0:0", "index": 0, "part": 0, "parts": 1, "total": 5, "skip": "too_long",
                "detail": "long", "shard": 0}]
    assembler.add(pa.Table.from_pylist(arrived, schema=OUT_SCHEMA))
    assembler.finish_lost()
    first, second = assembler.results[0], assembler.results[1]
    assert first.rows_in == 5 and first.rows_written == 0
    assert first.skipped == {"too_long": 1, INPUT_LOST: 4}
    assert first.files_failed[0]["source"] == "docs.jsonl#0" and "failed 3 times" in first.files_failed[0]["reason"]
    assert second.rows_in == 0 and second.files_failed[0]["source"] == "never.tar"
    assert not (tmp_path / ".progress" / (first.file + ".json")).exists()  # a rerun tries it again


def test_the_caps_live_in_one_place():
    """Every cap is defined once, in preprocess/records.py, and read from there."""
    caps = [name for name in dir(records) if name.startswith("MAX_") and name.endswith(("_BYTES", "_DEPTH"))]
    assert len(caps) >= 7
    source = Path(sources.__file__).read_text()
    assert not [name for name in caps if f"{name} =" in source]


def test_imagenet_reads_symlinked_class_folders_but_no_fifo(tmp_path, photos):
    """An ImageNet tree lists its own files (no record names them): a class folder symlinked from elsewhere is read,
    and a FIFO among the images is one skip, not a task blocked for ever."""
    root, elsewhere = tmp_path / "train", tmp_path / "elsewhere" / "n02123045"
    root.mkdir()
    elsewhere.mkdir(parents=True)
    photos["chelsea.png"].convert("RGB").save(elsewhere / "cat.JPEG")
    os.mkfifo(elsewhere / "fifo.JPEG")
    (root / "n02123045").symlink_to(elsewhere)
    names = tmp_path / "names.txt"
    names.write_text("n02123045 tabby, tabby cat\n")
    with deadline(60):
        shards = list_shards([str(root)], "imagenet", 10, class_names=str(names))
        got = {r["key"]: r["error"] for r in read_shard_records(shards[0])}
    assert got == {"n02123045/cat.JPEG": None, "n02123045/fifo.JPEG": BAD_RECORD}


def test_a_line_or_record_over_the_json_cap_is_one_skip_and_the_lines_after_it_are_read(tmp_path, monkeypatch,
                                                                                       tokenizer_dir, photos):
    """A JSON line longer than MAX_JSON_BYTES is passed over in chunks (never held whole) and the next line starts
    where it should; a key.json or line over the cap is a skip before json parses it."""
    monkeypatch.setattr(sources, "MAX_JSON_BYTES", 1000)
    monkeypatch.setattr(records, "MAX_JSON_BYTES", 1000)
    long_doc = json.dumps({"text": "word " * 2000})  # 10 kB
    (tmp_path / "docs.jsonl").write_text("\n".join([json.dumps({"text": "a"}), long_doc, json.dumps({"text": "b"})])
                                         + "\n")
    rows = converted([str(tmp_path / "docs.jsonl")], ConvertConfig(task="text", tokenizer=str(tokenizer_dir)))
    assert rows["docs.jsonl#0:1"]["skip"] == TOO_LONG
    assert rows["docs.jsonl#0:0#0"]["skip"] is None and rows["docs.jsonl#0:2#0"]["skip"] is None
    photos["chelsea.png"].save(tmp_path / "chelsea.png")
    lines = [{"id": "l0", "image": "chelsea.png", "conversations": CONVERSATION},
             {"id": "l1", "image": "chelsea.png", "conversations": CONVERSATION, "pad": "x" * 5000},
             {"id": "l2", "image": "chelsea.png", "conversations": CONVERSATION}]
    (tmp_path / "llava.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    got = {r["key"]: r["error"] for r in read_all([str(tmp_path / "llava.jsonl")], str(tmp_path))}
    assert got == {"l0": None, "llava.jsonl#0:1": BAD_RECORD, "l2": None}


def test_an_image_behind_a_url_is_read_up_to_the_cap(monkeypatch):
    """Image roots fsspec opens (here its in-memory filesystem) are read with the same byte cap as local files."""
    import fsspec

    monkeypatch.setattr(sources, "MAX_IMAGE_BYTES", 100)
    fs = fsspec.filesystem("memory")
    fs.pipe({"/caps-test/small.png": b"x" * 100, "/caps-test/big.png": b"x" * 101})
    try:
        assert sources.read_file("memory://caps-test", "small.png", "image") == b"x" * 100
        with pytest.raises(records.Skip) as skip:
            sources.read_file("memory://caps-test", "big.png", "image")
        assert skip.value.reason == IMAGE_TOO_LARGE
    finally:
        fs.rm("/caps-test", recursive=True)


def test_a_json_list_entry_too_deep_or_not_unicode_is_one_skip(tmp_path, photos, und_cfg, tokenizer_dir):
    """A JSON-list file is parsed whole on the driver: an entry deeper than MAX_JSON_DEPTH never goes on to a task
    (Ray pickles what a task gets, and pickle recurses per level); a surrogate in an id is that entry's skip."""
    photos["chelsea.png"].save(tmp_path / "chelsea.png")
    deep: object = "x"
    for _ in range(500):
        deep = [deep]
    entries = [{"id": "good", "image": "chelsea.png", "conversations": CONVERSATION}, deep,
               {"id": "\ud800", "image": "chelsea.png", "conversations": CONVERSATION}]
    (tmp_path / "llava.json").write_text(json.dumps(entries))
    rows = converted([str(tmp_path / "llava.json")], und_cfg, str(tmp_path))
    assert {k: r["skip"] for k, r in rows.items()} == {"good": None, "1": BAD_RECORD, "2": BAD_RECORD}
    assert "nested 500 deep" in rows["1"]["detail"] and "id:" in rows["2"]["detail"]
    (tmp_path / "docs.json").write_text(json.dumps([{"text": "a"}, deep]))
    text_cfg = ConvertConfig(task="text", tokenizer=str(tokenizer_dir))
    documents = [r for shard in list_shards([str(tmp_path / "docs.json")], "jsonl", 10) for r in
                 read_shard_records(shard)]
    assert [convert_record(r, text_cfg)[0].get("skip") for r in documents] == [None, BAD_RECORD]
