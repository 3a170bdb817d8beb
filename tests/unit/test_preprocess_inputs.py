"""Inputs that must neither stop nor fool the preprocess job: broken tars, records with wrong types, formats read
the way users mean them, image paths and manifest entries that leave their folder, credentials in input URLs.

Every bad input is built for real (tarfile, JSON files, the photographs). Most tests call what a Ray task runs
(the readers and converters) directly; one test runs every kind at once (with
tests/integration/test_preprocess.py's) through `ray job submit` and an embedded Ray, and the good records alone:
the manifests' accounting, files_failed, the good records' rows, and that no credential reaches an output file or a
log.

In-process tests here; the ones that start processes or take long are in tests/integration/test_preprocess_inputs.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from model.chat_format import control_ids
from model.manifest import Manifest, ShardEntry
from preprocess.records import (
    FILE_FAILED,
    ConvertConfig,
    convert_record,
)
from preprocess.sources import list_shards, read_shard_records, redact
from tests.support import CAPTION, CONVERSATION, folder, member_offsets, samples, symlink, tar_bytes, write_tar


def read_all(inputs: list[str], fmt: str = "auto", image_root: str = "", shard_size: int = 100) -> list[dict]:
    """What the job's read tasks produce for these inputs, shard after shard."""
    shards = list_shards(inputs, fmt, shard_size, image_root)
    return [r for shard in shards for r in read_shard_records(shard)]


def outcome(records: list[dict]) -> list[tuple[str, str | None]]:
    return [(r["key"], r["error"]) for r in records]


# --- tars ---

@pytest.mark.parametrize("where", ["in a member's data", "in a header", "between members"])
def test_a_cut_tar_keeps_the_records_before_the_cut(tmp_path, jpeg, where):
    """Before: a cut in a member's data raised tarfile.ReadError out of the task (the job died); a cut in a
    header or between members read as a whole, shorter tar, the loss unseen."""
    data = tar_bytes(samples(["k0", "k1", "k2", "k3"], jpeg))
    header, body = member_offsets(data)["k2.jpg"]
    cut = {"in a member's data": body + 1000, "in a header": header + 100, "between members": header}[where]
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:cut])
    records = read_all([str(path)])
    # Cut inside k2.jpg, the member being read names the broken record; at a header the last one read is
    # suspect (its next member may be what was lost).
    kept, broken = (["k0", "k1"], "k2") if where == "in a member's data" else (["k0"], "k1")
    assert outcome(records) == [(k, None) for k in kept] + [(broken, "tar_truncated"), ("", FILE_FAILED)]
    assert all(r["images"] == [jpeg] and r["text"] == f"{CAPTION} ({r['key']})".encode() for r in records[:-2])
    why = "unexpected end of data" if where == "in a member's data" else f"the tar ends at byte {cut}"
    assert why in records[-1]["detail"] and why in records[-2]["detail"]
    assert records[-1]["total"] == len(records)  # the driver waits for exactly these rows


def test_unreadable_tars_are_failed_files(tmp_path, jpeg):
    """Before: each raised out of the read task and ended the job."""
    gz = bytearray(tar_bytes(samples(["k0", "k1"], jpeg), mode="w:gz"))
    gz[20:60] = b"x" * 40  # the deflate stream's start
    cases = {"empty.tar": b"", "jpeg.tar": jpeg, "random.tar": np.random.default_rng(0).bytes(5000),
             "bad-start.tar.gz": bytes(gz)}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name in [*cases, "missing.tar"]:
        records = read_all([str(tmp_path / name)])
        assert outcome(records) == [("", FILE_FAILED)], name
        assert records[0]["detail"], name


def test_a_corrupt_gzip_tar_keeps_what_decoded_before_the_fault(tmp_path, jpeg):
    """Before: tarfile's own gzip stream read the garbage as the end of the archive: fewer records, no error."""
    data = tar_bytes(samples([f"k{i}" for i in range(6)], jpeg), mode="w:gz")
    (tmp_path / "good.tar.gz").write_bytes(data)
    assert outcome(read_all([str(tmp_path / "good.tar.gz")])) == [(f"k{i}", None) for i in range(6)]
    corrupt = bytearray(data)
    corrupt[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    (tmp_path / "corrupt.tar.gz").write_bytes(bytes(corrupt))
    records = read_all([str(tmp_path / "corrupt.tar.gz")], fmt="wds")
    *good, truncated, failed = outcome(records)
    assert 1 <= len(good) < 6 and all(error is None for _, error in good)
    assert [k for k, _ in good] == [f"k{i}" for i in range(len(good))]
    assert truncated == (f"k{len(good)}", "tar_truncated") and failed == ("", FILE_FAILED)
    assert all(r["images"] == [jpeg] for r in records[:len(good)])


def test_duplicate_symlink_and_directory_members(tmp_path, jpeg):
    """Before: a duplicate member name raised ValueError out of webdataset's group_by_keys (the job died);
    a symlink member was dropped without a word."""
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg)
    members = [("a.jpg", jpeg), ("a.txt", b"first"), ("a.jpg", jpeg[:100]),  # which a.jpg is meant?
               symlink("b.jpg", str(outside)), ("b.txt", b"a link"),
               folder("c"), ("c/d.jpg", jpeg), ("c/d.txt", b"in a folder"),
               folder("e.jpg"), ("e.txt", b"a folder named like an image"),
               ("f.jpg", jpeg), ("f.txt", b"good")]
    (tmp_path / "members.tar").write_bytes(tar_bytes(members))
    records = read_all([str(tmp_path / "members.tar")])
    assert outcome(records) == [("a", "duplicate_member"), ("b", "member_not_file"), ("c/d", None),
                                ("e", "image_missing"), ("f", None)]
    assert "a.jpg" in records[0]["detail"] and "b.jpg" in records[1]["detail"]


def convert_all(records: list[dict], cfg: ConvertConfig) -> dict[str, dict]:
    """key -> the one output row of each record (what the job's convert tasks produce)."""
    rows = {}
    for record in records:
        out = convert_record(record, cfg)
        rows[record["key"]] = {"skip": None, "detail": None, **out[0]}
    return rows


def test_webdataset_json_with_wrong_types_is_a_bad_record_naming_the_field(tmp_path, jpeg, tokenizer_dir):
    """Before: a broken or wrongly typed key.json was ignored (the sample written as if it had none), and a
    `conversations` of the wrong shape was skipped without saying which field."""
    sidecars = {
        "caption_number": (b'{"caption": 5}', "json.caption"),
        "text_list": (b'{"text": ["a"]}', "json.text"),
        "not_object": (b"[1, 2]", "json"),
        "not_json": (b'{"caption": ', "json"),
        "conversations_str": (b'{"conversations": "hello"}', "json.conversations"),
        "value_number": (json.dumps({"conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                       {"from": "gpt", "value": 7}]}).encode(),
                         "conversations[1].value"),
        "fine": (json.dumps({"caption": None, "url": 3, "width": "x"}).encode(), None),  # fields we never read
    }
    members = {}
    for key, (sidecar, _) in sidecars.items():
        members.update({f"{key}.jpg": jpeg, f"{key}.txt": CAPTION.encode(), f"{key}.json": sidecar})
    tar = write_tar(tmp_path / "sidecars.tar", members)
    cfg = ConvertConfig(task="understanding", tokenizer=str(tokenizer_dir), system_prompt=None)
    rows = convert_all(read_all([str(tar)]), cfg)
    for key, (_, field) in sidecars.items():
        if field is None:
            assert rows[key]["skip"] is None, rows[key]
        else:
            assert rows[key]["skip"] == "bad_record", (key, rows[key])
            assert f"bad_record: {field}:" in rows[key]["detail"], (key, rows[key]["detail"])


# --- LLaVA / ShareGPT records ---


@pytest.fixture
def image_root(tmp_path, photos) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    photos["chelsea.png"].save(root / "chelsea.png")
    photos["coffee.png"].save(root / "coffee.png")
    return root


def test_llava_records_with_wrong_types_name_the_field(tmp_path, image_root, tokenizer_dir):
    """Before: an int `image` or a null in its list raised TypeError and a directory IsADirectoryError out of
    the task (the job died); bad conversations were skipped without naming the field."""
    cases = {
        "int_image": ({"image": 5}, "image"),
        "null_in_list": ({"image": ["chelsea.png", None]}, "image[1]"),
        "directory": ({"image": "sub"}, "image"),
        "conversations_str": ({"conversations": "What is this?"}, "conversations"),
        "turns_str": ({"conversations": ["<image>\nWhat?", "A cat."]}, "conversations[0]"),
        "no_from": ({"conversations": [{"value": "<image>\nWhat?"}, CONVERSATION[1]]}, "conversations[0].from"),
        "no_value": ({"conversations": [CONVERSATION[0], {"from": "gpt"}]}, "conversations[1].value"),
        "int_value": ({"conversations": [CONVERSATION[0], {"from": "gpt", "value": 3}]}, "conversations[1].value"),
        "role": ({"conversations": [CONVERSATION[0], {"from": "robot", "value": "hi"}]}, "conversations[1].from"),
    }
    data = [{"id": key, "image": "chelsea.png", "conversations": CONVERSATION, **change}
            for key, (change, _) in cases.items()]
    data += [{"id": ["a", "list"], "image": "chelsea.png", "conversations": CONVERSATION},
             {"id": "good", "image": "chelsea.png", "conversations": CONVERSATION}]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(data))
    cfg = ConvertConfig(task="understanding", tokenizer=str(tokenizer_dir), system_prompt=None)
    rows = convert_all(read_all([str(source)], image_root=str(image_root)), cfg)
    for key, (_, field) in cases.items():
        assert rows[key]["skip"] == "bad_record" and f"bad_record: {field}:" in rows[key]["detail"], rows[key]
    assert "directory" in rows["directory"]["detail"]
    assert rows["9"]["skip"] == "bad_record" and "bad_record: id:" in rows["9"]["detail"]  # keyed by position
    assert rows["good"]["skip"] is None and rows["good"]["images"]


def test_conversation_formats_are_read_as_users_mean_them(tmp_path, image_root, tokenizer, tokenizer_dir, special):
    """LLaVA lines, ShareGPT (LLaMA-Factory) lists and lines, text lines: detected from the first record;
    --input-format overrides; a record of another shape is a skip, never reread. Before: LLaVA lines were
    text documents (the whole JSON line became an answer) and ShareGPT was not known."""
    llava = [{"id": "l0", "image": "chelsea.png", "conversations": CONVERSATION},
             {"id": "l1", "conversations": [{"from": "human", "value": "Hi."}, {"from": "gpt", "value": "Hello."}]}]
    sharegpt = [{"messages": [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "<image>What is hot?"},
                              {"role": "assistant", "content": "The coffee."}], "images": ["coffee.png"]}]
    files = {
        "llava.jsonl": "\n".join(json.dumps(r) for r in llava) + "\n",
        "sharegpt.json": json.dumps(sharegpt),
        "sharegpt.jsonl": json.dumps(sharegpt[0]) + "\n",
        "docs.jsonl": json.dumps({"text": "A document."}) + "\n",
        "mixed.json": json.dumps([llava[0], sharegpt[0], {"caption": "x"}, "a string"]),
    }
    for name, text in files.items():
        (image_root / name).write_text(text)
    paths = [str(image_root / name) for name in files]
    assert [s.format for s in list_shards(paths, "auto", 100)] == ["llava", "sharegpt", "sharegpt", "jsonl", "llava"]

    cfg = ConvertConfig(task="understanding", tokenizer=str(tokenizer_dir), system_prompt="Default prompt.")
    rows = convert_all(read_all(paths[:3]), cfg)
    assert all(row["skip"] is None for row in rows.values()), rows
    answers = {key: [tokenizer.decode(row["input_ids"][span["start"]:span["end"]]) for span in row["loss_spans"]]
               for key, row in rows.items()}
    eos = tokenizer.eos_token
    assert answers["l0"] == [" A cat." + eos] and answers["l1"] == [" Hello." + eos]
    # ShareGPT records have no id: the list's is keyed by position, the lines' by file and line.
    assert answers["0"] == answers["sharegpt.jsonl#0:0"] == [" The coffee." + eos]
    assert rows["l0"]["input_ids"].count(special.image_placeholder) == 576
    assert rows["l1"]["input_ids"].count(special.image_placeholder) == 0
    for key in ("0", "sharegpt.jsonl#0:0"):
        text = tokenizer.decode(rows[key]["input_ids"])
        assert "Be brief." in text and "Default prompt." not in text  # the record's own system message
    assert "Default prompt." in tokenizer.decode(rows["l0"]["input_ids"])

    mixed = convert_all(read_all([paths[4]], image_root=str(image_root)), cfg)
    assert [(k, r["skip"]) for k, r in mixed.items()] == [("l0", None), ("1", "unknown_format"),
                                                         ("2", "unknown_format"), ("3", "unknown_format")]
    assert "sharegpt" in mixed["1"]["detail"] and "conversations" in mixed["2"]["detail"]

    as_text = list_shards([paths[0]], "jsonl", 100)  # the override wins over the records
    assert [s.format for s in as_text] == ["jsonl"]
    forced = read_all([paths[3]], fmt="llava")
    assert [r["error"] for r in forced] == ["unknown_format"]


def test_image_paths_that_leave_the_image_root_are_never_opened(tmp_path, image_root, photos, tokenizer_dir):
    """Before: `../secret.png` and absolute paths were joined to the root and read like any other image."""
    secret = tmp_path / "secret.png"
    photos["astronaut.png"].save(secret)
    data = [{"id": "up", "image": "../secret.png"}, {"id": "absolute", "image": str(secret)},
            {"id": "down_up", "image": "sub/../../secret.png"}, {"id": "in_list", "image": ["chelsea.png",
                                                                                          "../secret.png"]},
            {"id": "fine", "image": "sub/../chelsea.png"}]
    for entry in data:
        entry["conversations"] = CONVERSATION
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(data))
    sharegpt = tmp_path / "sharegpt.jsonl"
    sharegpt.write_text(json.dumps({"id": "sg", "images": ["../secret.png"], "messages": [
        {"role": "user", "content": "<image>What?"}, {"role": "assistant", "content": "A photo."}]}) + "\n")
    opened: list[str] = []

    def audit(event: str, args: tuple) -> None:  # every open() Python makes, fsspec's included
        if event == "open" and isinstance(args[0], str) and recording:
            opened.append(os.path.realpath(args[0]))

    recording = True
    sys.addaudithook(audit)  # hooks cannot be removed: this one records only while the flag is set
    try:
        records = read_all([str(source), str(sharegpt)], image_root=str(image_root))
    finally:
        recording = False
    assert outcome(records) == [("up", "image_path_unsafe"), ("absolute", "image_path_unsafe"),
                                ("down_up", "image_path_unsafe"), ("in_list", "image_path_unsafe"),
                                ("fine", None), ("sg", "image_path_unsafe")]
    assert "image[1]" in records[3]["detail"] and "images[0]" in records[5]["detail"]
    assert str(secret.resolve()) not in opened and str((image_root / "chelsea.png").resolve()) in opened


# --- image-caption pairs (captions: JSON lines, a JSON list, CSV) ---

def test_caption_pairs_become_generation_and_understanding_samples(tmp_path, image_root, tokenizer, tokenizer_dir):
    """`{"image", "caption"}` lines, a JSON list of them and a CSV with header image,caption are detected as
    captions; image paths are relative to the file's folder, or to --image-root when given; generation takes the
    caption as its prompt, understanding as the answer to an instruction (as a tar's key.txt)."""
    pairs = [{"id": "p0", "image": "chelsea.png", "caption": "A cat."},
             {"id": "p1", "image": "sub/../coffee.png", "caption": "A cup of coffee."}]
    (image_root / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (image_root / "pairs.json").write_text(json.dumps([{**p, "id": f"list-{p['id']}"} for p in pairs]))
    # Elsewhere, so its paths resolve only through --image-root; a byte-order mark, quoting, CRLF, an extra column.
    (tmp_path / "pairs.csv").write_text('\ufeffid,image,caption,url\r\ncsv-0,chelsea.png,"A cat, sitting.",x\r\n'
                                        'csv-1,coffee.png,"A cup\nof coffee.",y,an extra cell\r\n', newline="")
    jsonl, listed, csv = str(image_root / "pairs.jsonl"), str(image_root / "pairs.json"), str(tmp_path / "pairs.csv")
    assert [s.format for s in list_shards([jsonl, listed, csv], "auto", 100)] == ["captions"] * 3
    (forced,) = list_shards([csv], "captions", 100)
    assert forced.format == "captions"
    # csv keys a row's extra cells by None: the shard's entries must stay what Ray Data can ship (string keys).
    assert [sorted(e) for e in forced.entries] == [["caption", "id", "image", "url"]] * 2
    records = read_all([jsonl, listed]) + read_all([csv], image_root=str(image_root))
    assert outcome(records) == [("p0", None), ("p1", None), ("list-p0", None), ("list-p1", None),
                                ("csv-0", None), ("csv-1", None)]
    assert records[0]["images"] == records[4]["images"] == [(image_root / "chelsea.png").read_bytes()]

    gen = convert_all(records, ConvertConfig(task="generation", tokenizer=str(tokenizer_dir)))
    assert {k: r["caption"] for k, r in gen.items()} == {
        "p0": "A cat.", "p1": "A cup of coffee.", "list-p0": "A cat.", "list-p1": "A cup of coffee.",
        "csv-0": "A cat, sitting.", "csv-1": "A cup\nof coffee."}
    assert all(r["skip"] is None and len(r["gen_pixels"]) == 384 * 384 * 3 for r in gen.values())
    und = convert_all(records, ConvertConfig(task="understanding", tokenizer=str(tokenizer_dir),
                                             instructions=("Describe it.",)))
    (span,) = und["csv-0"]["loss_spans"]
    assert tokenizer.decode(und["csv-0"]["input_ids"][span["start"]:span["end"]]) == \
        f" A cat, sitting.{tokenizer.eos_token}"
    assert "Describe it." in tokenizer.decode(und["csv-0"]["input_ids"])
    # A captions file is no text corpus: the text task skips its records, never reads a caption as a document.
    text = convert_all(read_all([jsonl]), ConvertConfig(task="text", tokenizer=str(tokenizer_dir)))
    assert [r["skip"] for r in text.values()] == ["unknown_format"] * 2


def test_bad_caption_pairs_are_counted_skips_naming_why(tmp_path, image_root, jpeg, tokenizer_dir):
    """Each bad pair is one skip with its reason, read from JSON lines or CSV, never a crash or a silent drop."""
    (image_root / "random.png").write_bytes(np.random.default_rng(0).bytes(3000))
    (image_root / "cut.jpg").write_bytes(jpeg[:len(jpeg) // 2])
    (tmp_path / "secret.png").write_bytes(jpeg)
    lines = [
        ({"id": "good", "image": "chelsea.png", "caption": "A cat."}, None),
        ({"id": "absent", "image": "nope.png", "caption": "Gone."}, "image_missing"),
        ({"id": "no_image", "caption": "Nothing named."}, "image_missing"),
        ({"id": "random", "image": "random.png", "caption": "Noise."}, "image_unreadable"),
        ({"id": "cut", "image": "cut.jpg", "caption": "Half a photo."}, "image_corrupt"),
        ({"id": "empty", "image": "chelsea.png", "caption": ""}, "text_empty"),
        ({"id": "blank", "image": "chelsea.png", "caption": "  \n "}, "text_empty"),
        ({"id": "null", "image": "chelsea.png", "caption": None}, "text_missing"),
        ({"id": "no_caption", "image": "chelsea.png"}, "text_missing"),
        ({"id": "number", "image": "chelsea.png", "caption": 5}, "bad_record"),
        ({"id": "image_list", "image": ["chelsea.png"], "caption": "A list."}, "bad_record"),
        ({"id": "surrogate", "image": "chelsea.png", "caption": "\ud800"}, "text_not_utf8"),
        ({"id": "up", "image": "../secret.png", "caption": "Outside."}, "image_path_unsafe"),
        ({"id": "chat", "image": "chelsea.png", "conversations": CONVERSATION}, "unknown_format"),
        ("{not json", "bad_record"),
    ]
    (image_root / "pairs.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                                                    for r, _ in lines))
    (image_root / "pairs.csv").write_text("id,image,caption\nc_good,chelsea.png,A cat.\nc_empty,chelsea.png,\n"
                                          "c_absent,nope.png,Gone.\nc_short,chelsea.png\nc_no_image,,A cat.\n"
                                          "c_random,random.png,Noise.\n")
    csv_expected = [("c_good", None), ("c_empty", "text_empty"), ("c_absent", "image_missing"),
                    ("c_short", "text_missing"), ("c_no_image", "image_missing"), ("c_random", "image_unreadable")]
    records = read_all([str(image_root / "pairs.jsonl"), str(image_root / "pairs.csv")])
    expected = [(r["id"] if isinstance(r, dict) else "pairs.jsonl#0:14", why) for r, why in lines] + csv_expected
    for task in ("generation", "understanding"):
        rows = convert_all(records, ConvertConfig(task=task, tokenizer=str(tokenizer_dir)))
        assert [(k, r["skip"]) for k, r in rows.items()] == expected, task
        assert all(r["detail"] for r in rows.values() if r["skip"])
    assert "nope.png" in convert_all(records, ConvertConfig(task="generation", tokenizer=str(tokenizer_dir)))[
        "absent"]["detail"]


def test_a_captions_csv_the_csv_module_cannot_read_is_a_failed_file(tmp_path):
    """No header naming both columns, a field over the csv module's limit, bytes that are not UTF-8: the file is
    listed as failed (files_failed, with why) and the job goes on, rather than the listing raising."""
    files = {"no_header.csv": (b"chelsea.png,A cat.\n", "caption missing"),
             "huge.csv": (b'image,caption\nchelsea.png,"' + b"x" * 200_000 + b'"\n', "field larger than field limit"),
             "latin1.csv": ("image,caption\nchelsea.png,Caf\u00e9\n".encode("latin-1"), "UnicodeDecodeError")}
    for name, (data, why) in files.items():
        (tmp_path / name).write_bytes(data)
        records = read_all([str(tmp_path / name)])
        assert outcome(records) == [("", FILE_FAILED)], name
        assert why in records[0]["detail"], (name, records[0]["detail"])


def test_a_manifest_entry_outside_its_folder_is_refused(tmp_path):
    """Before: Manifest.read took any `file`, so a crafted manifest could point a reader anywhere."""
    for name in ("../elsewhere.arrow", "/etc/passwd", "sub/../../x.arrow", "..\\x.arrow", ""):
        Manifest(task="text", tokenizer_fingerprint="0", shards=[ShardEntry(name, 0, "0" * 64)]).write(tmp_path)
        with pytest.raises(ValueError, match="not inside the manifest's folder"):
            Manifest.read(tmp_path)
    Manifest(task="text", tokenizer_fingerprint="0", shards=[ShardEntry("sub/x.arrow", 0, "0" * 64)]).write(tmp_path)
    assert Manifest.read(tmp_path).shards[0].file == "sub/x.arrow"


def test_a_manifest_whose_prompt_counts_are_not_counts_is_refused(tmp_path):
    """A run prints a generation manifest's prompt counts at its start: anything but a count (or none) is refused
    when the manifest is read, where preflight turns it into one error line, not a traceback at the first print."""
    for bad in ("3", -1, 2.5, True, [1]):
        manifest = Manifest(task="generation", tokenizer_fingerprint="0", distinct_prompts=4)
        manifest.rows_sharing_a_prompt = bad
        manifest.write(tmp_path)
        with pytest.raises(ValueError, match="rows_sharing_a_prompt is .*, not a count"):
            Manifest.read(tmp_path)
    Manifest(task="generation", tokenizer_fingerprint="0", distinct_prompts=4, rows_sharing_a_prompt=0).write(tmp_path)
    assert Manifest.read(tmp_path).distinct_prompts == 4


# --- special strings in data, and records a task does not read ---

def test_a_quoted_image_placeholder_in_llava_text_stays_text(tmp_path, image_root, tokenizer, tokenizer_dir, special):
    """LLaVA marks images with <image>; a literal <image_placeholder> in a question or an answer is text. Before:
    <image> was rewritten to <image_placeholder> first, so the quoted one counted as a second image marker (the
    record a bad_record), or, with no <image>, took the image's place in the middle of the question."""
    quoted = "What does <image_placeholder> mean?"
    answer = "It is written <image_placeholder>."
    data = [{"id": "marked", "image": "chelsea.png", "conversations": [
                {"from": "human", "value": f"<image>\n{quoted}"}, {"from": "gpt", "value": answer}]},
            {"id": "unmarked", "image": "chelsea.png", "conversations": [
                {"from": "human", "value": quoted}, {"from": "gpt", "value": answer}]}]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(data))
    cfg = ConvertConfig(task="understanding", tokenizer=str(tokenizer_dir), system_prompt=None)
    rows = convert_all(read_all([str(source)], image_root=str(image_root)), cfg)
    for key in ("marked", "unmarked"):
        ids = rows[key]["input_ids"]
        assert rows[key]["skip"] is None, rows[key]
        assert ids.count(special.image_placeholder) == 576 and len(rows[key]["images"]) == 1
        assert ids.count(special.begin_of_image) == ids.count(special.end_of_image) == 1
        image = ids.index(special.begin_of_image)  # the image comes first, as LLaVA's marker (or its absence) says
        assert ids[image + 1:image + 577] == [special.image_placeholder] * 576
        assert tokenizer.decode(ids[1:image]) == "<|User|>: "
        assert tokenizer.decode(ids[image + 578:]) == f"\n{quoted}\n\n<|Assistant|>: {answer}{tokenizer.eos_token}"


def test_a_document_quoting_special_tokens_is_cut_into_pieces_that_fit(tokenizer):
    """split_document counts tokens as text_sample encodes the pieces (special strings spelled out). Before: it
    counted each special string as one token while the pieces spell it out in ~10-26, so a piece came out several
    times too long, 64 shrinking steps were not enough, and the document was skipped as too_long."""
    from model.tokenizer import FORMAT_TOKENS
    from preprocess.records import split_document

    document = " ".join(f"word{i} {token}" for i in range(40) for token in FORMAT_TOKENS)
    context = 128
    pieces = split_document(tokenizer, document, context, "doc")
    assert len(pieces) > 1 and all(len(p.input_ids) <= context for p in pieces)
    controls = control_ids(tokenizer)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        assert piece.input_ids[0] == bos and (piece.input_ids[-1] == eos) == last
        assert not controls.intersection(piece.input_ids[1:len(piece.input_ids) - last])
    texts = [tokenizer.decode(p.input_ids[1:len(p.input_ids) - (i == len(pieces) - 1)]) for i, p in enumerate(pieces)]
    assert "".join(texts) == document


@pytest.fixture
def loose_tokenizer_dir(tokenizer_dir, tmp_path) -> Path:
    """The test tokenizer with <begin_of_image> an ordinary added token: plain text can still encode it."""
    from model.tokenizer import BEGIN_OF_IMAGE

    out = tmp_path / "loose-tokenizer"
    out.mkdir()
    model = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    for token in model["added_tokens"]:
        token["special"] = token["special"] and token["content"] != BEGIN_OF_IMAGE
    (out / "tokenizer.json").write_text(json.dumps(model))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [t for t in config["extra_special_tokens"] if t != BEGIN_OF_IMAGE]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_text_a_tokenizer_cannot_keep_plain_is_a_bad_record(tmp_path, jpeg, loose_tokenizer_dir, image_root):
    """Before: encode_text's ValueError (the text would encode as a control token) left the generation and text
    converters uncaught and ended the task; understanding already caught it."""
    from model.tokenizer import BEGIN_OF_IMAGE, load_tokenizer

    assert BEGIN_OF_IMAGE not in load_tokenizer(loose_tokenizer_dir).all_special_tokens
    tar = write_tar(tmp_path / "pairs.tar", {"quoted.jpg": jpeg, "quoted.txt": f"a cat {BEGIN_OF_IMAGE}".encode(),
                                             "plain.jpg": jpeg, "plain.txt": b"a cat"})
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": f"a document {BEGIN_OF_IMAGE}"}) + "\n" + json.dumps({"text": "plain"}) + "\n")
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "quoted", "image": "chelsea.png", "conversations": [
        CONVERSATION[0], {"from": "gpt", "value": f"A {BEGIN_OF_IMAGE} cat."}]}]))
    cases = [("generation", [str(tar)], {"quoted": "caption", "plain": None}),
             ("text", [str(docs)], {"docs.jsonl#0:0": "text", "docs.jsonl#0:1": None}),
             ("understanding", [str(llava)], {"quoted": ""})]
    for task, inputs, expected in cases:
        cfg = ConvertConfig(task=task, tokenizer=str(loose_tokenizer_dir), system_prompt=None)
        rows = convert_all(read_all(inputs, image_root=str(image_root)), cfg)
        for key, field in expected.items():
            if field is None:
                assert rows[key]["skip"] is None, (task, rows[key])
            else:
                assert rows[key]["skip"] == "bad_record", (task, rows[key])
                assert f"bad_record: {field}" in rows[key]["detail"] and BEGIN_OF_IMAGE in rows[key]["detail"]


def test_a_record_its_task_does_not_read_is_unknown_format(tmp_path, jpeg, image_root, tokenizer_dir):
    """A JSON line of a text corpus given to an image task, or an image record given to the text task, is a skip
    with its reason. Before: under understanding the raw JSON line became the answer of a sample with no image."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text(json.dumps({"text": "A document."}) + "\n" + json.dumps({"caption": "A cat."}) + "\n")
    tar = write_tar(tmp_path / "pairs.tar", samples(["k0"], jpeg))
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"id": "l0", "image": "chelsea.png", "conversations": CONVERSATION}]))
    cases = [("understanding", [str(docs)], "text document"), ("generation", [str(docs)], "text document"),
             ("text", [str(tar), str(llava)], "image or chat record")]
    for task, inputs, why in cases:
        cfg = ConvertConfig(task=task, tokenizer=str(tokenizer_dir))
        rows = convert_all(read_all(inputs, image_root=str(image_root)), cfg)
        assert len(rows) == 2 and all(r["skip"] == "unknown_format" and why in r["detail"] for r in rows.values()), \
            (task, rows)
    # Each still reads what it should: the same files under the right task convert.
    assert convert_all(read_all([str(docs)]), ConvertConfig(task="text", tokenizer=str(tokenizer_dir)))[
        "docs.jsonl#0:0"]["skip"] is None
    und = ConvertConfig(task="understanding", tokenizer=str(tokenizer_dir))
    rows = convert_all(read_all([str(tar), str(llava)], image_root=str(image_root)), und)
    assert [r["skip"] for r in rows.values()] == [None, None]


# --- credentials ---

@pytest.mark.parametrize("url, secrets", [
    ("s3://AKIAKEY:se/cr+et@bucket/shard-0001.tar", ["AKIAKEY", "se/cr+et"]),
    ("https://user:pa55@host.example/x.tar", ["user", "pa55"]),
    ("https://b.s3.amazonaws.com/x.tar?X-Amz-Algorithm=AWS4&X-Amz-Credential=AKIA%2F2024&X-Amz-Signature=abc123"
     "&X-Amz-Security-Token=tok9", ["AKIA%2F2024", "abc123", "tok9"]),
    ("https://acct.blob.core.windows.net/c/x.tar?sv=2022&sig=AzUr3Sig%3D&se=2030", ["AzUr3Sig"]),
    ("https://h/x.jsonl?token=t0k3n&access_token=a1&api_key=k2#frag", ["t0k3n", "a1", "k2"]),
    ("FileNotFoundError: http://u:p4ss@127.0.0.1:8/x.tar?sig=s1g not found", ["p4ss", "s1g"]),
])
def test_redact_removes_url_credentials(url, secrets):
    redacted = redact(url)
    assert not [s for s in secrets if s in redacted], redacted
    assert "***" in redacted


def test_redact_keeps_what_is_not_a_credential():
    for text in ("/data/shards/00001.tar", "s3://bucket/dir/x.tar", "https://h/x.tar?versionId=7&X-Amz-Expires=60",
                 "/data/llava.json#3", "gs://b/a@2x.tar"):
        assert redact(text) == text
