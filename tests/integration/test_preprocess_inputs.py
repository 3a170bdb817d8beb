"""Inputs that must neither stop nor fool the preprocess job: broken tars, records with wrong types, formats read
the way users mean them, image paths and manifest entries that leave their folder, credentials in input URLs.

Every bad input is built for real (tarfile, JSON files, the photographs). Most tests call what a Ray task runs
(the readers and converters) directly; one test runs every kind at once (with
tests/integration/test_preprocess.py's) through `ray job submit` and an embedded Ray, and the good records alone:
the manifests' accounting, files_failed, the good records' rows, and that no credential reaches an output file or a
log.

Tests that start processes or take long here; the in-process ones are in tests/unit/test_preprocess_inputs.py.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import subprocess
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

from model.chat_format import control_ids
from model.manifest import Manifest, file_sha256, read_shard
from preprocess.cli import main
from preprocess.job import DIE_ENV
from preprocess.records import (
    BAD_RECORD,
    DUPLICATE_MEMBER,
    IMAGE_MISSING,
    IMAGE_PATH_UNSAFE,
    IMAGE_TOO_LARGE,
    IMAGE_UNREADABLE,
    INPUT_LOST,
    MAX_MEMBER_BYTES,
    MAX_SAMPLE_TEXT_BYTES,
    MEMBER_NOT_FILE,
    SKIP_REASONS,
    TAR_TRUNCATED,
    TEXT_EMPTY,
    TEXT_MISSING,
    TEXT_NOT_UTF8,
    TOO_LONG,
    UNKNOWN_FORMAT,
)
from preprocess.sources import redact
from tests.support import CAPTION, CONVERSATION, encoded, folder, member_offsets, samples, symlink, tar_bytes


class _Server:
    """An HTTP server on the loopback address that serves files only to requests carrying the credentials,
    byte ranges included (what fsspec's HTTP files ask for)."""

    def __init__(self, files: dict[str, bytes], user: str, password: str, signature: str) -> None:
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self.serve(body=False)

            def do_GET(self) -> None:
                self.serve(body=True)

            def serve(self, body: bool) -> None:
                url = urlsplit(self.path)
                if self.headers.get("Authorization") != auth or parse_qs(url.query).get("X-Amz-Signature") != [
                        signature]:
                    self.send_error(403)
                    return
                if url.path not in files:
                    self.send_error(404)
                    return
                data = files[url.path]
                start, end = 0, len(data) - 1
                ranged = self.headers.get("Range")
                if ranged:
                    first, last = ranged.removeprefix("bytes=").split("-")
                    start, end = int(first), min(int(last) if last else end, end)
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Length", str(end - start + 1))
                self.send_header("Accept-Ranges", "bytes")
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(data[start:end + 1])

            def log_message(self, *args) -> None:  # quiet
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> int:
        self.thread.start()
        return self.httpd.server_address[1]

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


# --- every kind at once: `ray job submit`, an embedded Ray, and the good records alone ---

def by_key(members: dict[str, bytes]) -> dict[str, list[tuple[str, bytes]]]:
    grouped: dict[str, list[tuple[str, bytes]]] = {}
    for name, data in members.items():
        grouped.setdefault(name.split(".")[0], []).append((name, data))
    return grouped


def tar_kinds(photos: dict, jpeg: bytes, quoted: str) -> list[tuple[str, list, str | None]]:
    """(key, tar members, skip reason or None: written) of every kind a sample in a tar can be: the photographs and
    the bad-input corpus of tests/integration/test_preprocess.py, then this module's kinds, shuffled together."""
    from tests.support import MINIMAL_EPS, bad_corpus, photo_members

    members, expected = bad_corpus(photos)
    bad = by_key(members)
    kinds = [(key, bad.get(key, []), reason) for key, reason in expected.items()]
    kinds += [(key, group, None) for key, group in by_key(photo_members(photos)).items()]
    sidecars = {"j_caption_number": b'{"caption": 5}', "j_text_list": b'{"text": ["a"]}', "j_not_object": b"[1, 2]",
                "j_not_json": b'{"caption": ', "j_conversations_str": b'{"conversations": "hello"}',
                "j_fields_unread": json.dumps({"caption": None, "url": 3, "width": "x"}).encode()}
    kinds += [(key, [(f"{key}.jpg", jpeg), (f"{key}.txt", CAPTION.encode()), (f"{key}.json", sidecar)],
               None if key == "j_fields_unread" else BAD_RECORD) for key, sidecar in sidecars.items()]
    strip = encoded(Image.fromarray(np.tile(np.arange(50000, dtype=np.uint8), (32, 1))), "PNG")  # 50000x32, 5 KB
    kinds += [
        ("t_eps", [("t_eps.jpg", MINIMAL_EPS), ("t_eps.txt", b"A line drawing.")], IMAGE_UNREADABLE),
        ("t_strip", [("t_strip.png", strip), ("t_strip.txt", b"A long grey gradient.")], None),
        ("t_quoted", [("t_quoted.jpg", jpeg), ("t_quoted.txt", f"A cat {quoted} here.".encode())], None),
        ("t_no_text", [("t_no_text.jpg", jpeg)], TEXT_MISSING),
        ("t_dup", [("t_dup.jpg", jpeg), ("t_dup.txt", b"Which one?"), ("t_dup.jpg", jpeg[:100])], DUPLICATE_MEMBER),
        ("t_link", [symlink("t_link.jpg", "/etc/hostname"), ("t_link.txt", b"A link.")], MEMBER_NOT_FILE),
        ("t_dir_image", [folder("t_dir_image.jpg"), ("t_dir_image.txt", b"A folder named .jpg.")], IMAGE_MISSING),
        ("t_in/folder", [folder("t_in"), ("t_in/folder.jpg", jpeg), ("t_in/folder.txt", b"In a folder.")], None),
        # issue #27: each stopped the job (exit 1, no manifest) or failed its whole tar
        ("u_surrogate", [("u_surrogate.jpg", jpeg), ("u_surrogate.json", b'{"caption": "\\ud800"}')], TEXT_NOT_UTF8),
        ("u_name\\udcff", [("u_name\udcff.jpg", jpeg), ("u_name\udcff.txt", b"Not UTF-8.")], BAD_RECORD),
        ("u_deep", [("u_deep.jpg", jpeg), ("u_deep.json", DEEP.encode())], BAD_RECORD),
        ("u_digits", [("u_digits.jpg", jpeg), ("u_digits.json", DIGITS.encode())], BAD_RECORD),
        ("u_long", [("u_long.jpg", jpeg), ("u_long.txt", b"word " * (MAX_SAMPLE_TEXT_BYTES // 4))], TOO_LONG),
    ]
    random.Random(0).shuffle(kinds)  # bad among good
    return kinds


DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError
DIGITS = '{"id": "digits", "caption": "x", "n": ' + "9" * 5000 + "}"  # json.loads: a plain ValueError


def chat_kinds(root: Path, quoted: str) -> dict[str, list[tuple[object, str | None]]]:
    """(record, skip reason or None) of every kind a LLaVA list, LLaVA lines or a ShareGPT list can hold; image
    paths are relative to `root`, which holds chelsea.png, coffee.png and the folder sub/ (secret.png is outside)."""
    def llava(key: str, image: object = "chelsea.png", conversations: object = CONVERSATION) -> dict:
        return {"id": key, "image": image, "conversations": conversations}

    question, answer = CONVERSATION
    secret = str(root.parent / "secret.png")
    two = [{"from": "human", "value": "<image>\n<image>\nWhat differs?"}, {"from": "gpt", "value": "A cat, a cup."},
           {"from": "human", "value": "Which is warm?"}, {"from": "gpt", "value": "The coffee."}]
    sharegpt = {"id": "s_good", "images": ["coffee.png"], "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>What is hot?"},
        {"role": "assistant", "content": "The coffee."}]}
    return {
        "llava.json": [
            (llava("l_good"), None),
            (llava("l_two", ["chelsea.png", "coffee.png"], two), None),
            (llava("l_no_marker", conversations=[{"from": "human", "value": "What animal?"}, answer]), None),
            (llava("l_quoted", conversations=[{"from": "human", "value": f"<image>\nWhat is {quoted}?"},
                                              {"from": "gpt", "value": f"It says {quoted}."}]), None),
            (llava("l_path_fine", "sub/../chelsea.png"), None),
            (llava("l_missing", "nope.png"), IMAGE_MISSING),
            (llava("l_broken", conversations=[{"speaker": "x"}]), BAD_RECORD),
            (llava("l_int_image", 5), BAD_RECORD),
            (llava("l_null_in_list", ["chelsea.png", None]), BAD_RECORD),
            (llava("l_directory", "sub"), BAD_RECORD),
            (llava("l_conversations_str", conversations="What is this?"), BAD_RECORD),
            (llava("l_turns_str", conversations=["<image>\nWhat?", "A cat."]), BAD_RECORD),
            (llava("l_no_from", conversations=[{"value": "<image>\nWhat?"}, answer]), BAD_RECORD),
            (llava("l_no_value", conversations=[question, {"from": "gpt"}]), BAD_RECORD),
            (llava("l_int_value", conversations=[question, {"from": "gpt", "value": 3}]), BAD_RECORD),
            (llava("l_role", conversations=[question, {"from": "robot", "value": "hi"}]), BAD_RECORD),
            ({"id": ["a", "list"], "image": "chelsea.png", "conversations": CONVERSATION}, BAD_RECORD),
            (llava("l_up", "../secret.png"), IMAGE_PATH_UNSAFE),
            (llava("l_absolute", secret), IMAGE_PATH_UNSAFE),
            (llava("l_down_up", "sub/../../secret.png"), IMAGE_PATH_UNSAFE),
            (llava("l_in_list", ["chelsea.png", "../secret.png"]), IMAGE_PATH_UNSAFE),
            ({**sharegpt, "id": "l_sharegpt"}, UNKNOWN_FORMAT),
            ({"id": "l_caption", "caption": "A cat."}, UNKNOWN_FORMAT),
            ("a string", UNKNOWN_FORMAT),
            ({"id": "\udc80", "image": "chelsea.png", "conversations": CONVERSATION}, BAD_RECORD),  # issue #27
            (json.loads("[" * 200 + "]" * 200), BAD_RECORD),  # deeper than MAX_JSON_DEPTH: stays on the driver
        ],
        "llava.jsonl": [
            (llava("n_good", "coffee.png"), None),
            (llava("n_int_image", 5), BAD_RECORD),
            ("{not json", BAD_RECORD),
            (llava("n_up", "../secret.png"), IMAGE_PATH_UNSAFE),
            ({"id": "n_messages", "messages": []}, UNKNOWN_FORMAT),
            (llava("\ud800"), BAD_RECORD),  # issue #27: a surrogate in an id reached Arrow
            (DEEP, BAD_RECORD),
            (DIGITS, BAD_RECORD),
            (llava("n_fifo", "fifo.png"), BAD_RECORD),  # the task blocked for ever
            (llava("n_zero", "zero.png"), IMAGE_PATH_UNSAFE),  # a symlink to /dev/zero: memory until killed
            (llava("n_link_out", "out.png"), IMAGE_PATH_UNSAFE),  # a symlink out of the root was followed
        ],
        "sharegpt.json": [
            (sharegpt, None),
            ({**sharegpt, "id": "s_role", "messages": [{"role": "user", "content": "<image>Hi"},
                                                       {"role": "robot", "content": "Hello."}]}, BAD_RECORD),
            ({**sharegpt, "id": "s_absolute", "images": [secret]}, IMAGE_PATH_UNSAFE),
        ],
    }


@dataclasses.dataclass
class Corpus:
    """Inputs with every kind of bad input among good records (`mixed`), the same good records in files of their
    own (`good`), what each record must become and which input files must be listed as failed."""

    images: Path
    mixed: list[str] = dataclasses.field(default_factory=list)
    good: list[str] = dataclasses.field(default_factory=list)
    expected: dict[str, str | None] = dataclasses.field(default_factory=dict)  # key -> skip reason, None: written
    failed: list[str] = dataclasses.field(default_factory=list)  # the manifest's files_failed sources


def every_kind(root: Path, photos: dict, jpeg: bytes, quoted: str, served: dict[str, bytes], url: str,
               query: str) -> Corpus:
    """Writes the corpus under `root`; `served` receives what the HTTP server at `url` serves (`url` and `query`
    carry the credentials it asks for)."""
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    photos["chelsea.png"].save(images / "chelsea.png")
    photos["coffee.png"].save(images / "coffee.png")
    photos["astronaut.png"].save(root / "secret.png")
    os.mkfifo(images / "fifo.png")
    (images / "zero.png").symlink_to("/dev/zero")
    (images / "out.png").symlink_to(root / "secret.png")
    corpus, good_members = Corpus(images), []

    def expect(key: str, reason: str | None) -> None:
        assert key not in corpus.expected, key
        corpus.expected[key] = reason

    def add_tar(name: str, kinds: list, broken: bytes | None = None, failed: bool = False) -> None:
        """`kinds` as written; `broken`: the bytes the file really holds (cut, corrupt)."""
        (root / name).write_bytes(tar_bytes([m for _, members, _ in kinds for m in members]) if broken is None
                                  else broken)
        corpus.mixed.append(str(root / name))
        corpus.failed += [str(root / name)] if failed else []
        for key, members, reason in kinds:
            expect(key, reason)
            good_members.extend(members if reason is None else [])

    def samples_of(prefix: str, n: int) -> list:
        return [(f"{prefix}{i}", list(samples([f"{prefix}{i}"], jpeg).items()), None) for i in range(n)]

    add_tar("hard-00000.tar", tar_kinds(photos, jpeg, quoted))
    cut = samples_of("c", 3)
    whole = tar_bytes([m for _, members, _ in cut for m in members])
    cut[2] = (*cut[2][:2], TAR_TRUNCATED)  # cut inside c2.jpg: c0 and c1 are kept
    add_tar("cut-00001.tar", cut, broken=whole[:member_offsets(whole)["c2.jpg"][1] + 500], failed=True)
    gz = samples_of("z", 3)
    crc = bytearray(tar_bytes([m for _, members, _ in gz for m in members], mode="w:gz"))
    crc[-8:-4] = bytes(a ^ 0xFF for a in crc[-8:-4])  # the gzip trailer's CRC: found wrong at the stream's end
    gz[2] = (*gz[2][:2], TAR_TRUNCATED)  # the last sample read before the fault is suspect
    add_tar("corrupt-00002.tar.gz", gz, broken=bytes(crc), failed=True)
    bad_start = bytearray(tar_bytes(samples(["x0"], jpeg), mode="w:gz"))
    bad_start[20:60] = b"x" * 40  # the deflate stream's start
    unreadable = {"empty-00003.tar": b"", "not-a-tar-00004.tar": jpeg, "bad-start-00005.tar.gz": bytes(bad_start),
                  "random-00006.tar": np.random.default_rng(0).bytes(5000)}
    for name, data in unreadable.items():
        add_tar(name, [], broken=data, failed=True)

    # A few kB of .tar.gz holding a member over the cap: passed over unread (issue #27: a 2 GiB one peaked at 6.6 GB).
    huge = [("u_huge", [("u_huge.jpg", bytes(MAX_MEMBER_BYTES + 1)), ("u_huge.txt", b"Zeros.")], IMAGE_TOO_LARGE),
            *samples_of("h", 1)]
    add_tar("huge-00007.tar.gz", huge, broken=tar_bytes([m for _, members, _ in huge for m in members], mode="w:gz"))
    # An input whose task ends its worker on every try (DIE_ENV), as one killed for memory: listed, its records lost.
    (root / "lost.jsonl").write_text("".join(json.dumps({"id": f"lost{i}", "image": "chelsea.png",
                                                         "conversations": CONVERSATION}) + "\n" for i in range(3)))
    corpus.mixed.append(str(root / "lost.jsonl"))
    corpus.failed.append(f"{root / 'lost.jsonl'}#0")
    for i in range(3):
        expect(f"lost{i}", INPUT_LOST)

    remote = samples_of("r", 2)
    served["/remote.tar"] = tar_bytes([m for _, members, _ in remote for m in members])
    corpus.mixed += [f"{url}/remote.tar{query}", f"{url}/missing.tar{query}"]
    corpus.failed.append(redact(f"{url}/missing.tar{query}"))
    for key, members, reason in remote:
        expect(key, reason)
        good_members.extend(members)
    (root / "good.tar").write_bytes(tar_bytes(good_members))
    corpus.good.append(str(root / "good.tar"))

    for name, records in chat_kinds(images, quoted).items():
        lines = name.endswith(".jsonl")
        write = (lambda rs: "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rs)) if lines \
            else json.dumps
        (root / name).write_text(write([r for r, _ in records]))
        (root / f"good-{name}").write_text(write([r for r, reason in records if reason is None]))
        corpus.mixed.append(str(root / name))
        corpus.good.append(str(root / f"good-{name}"))
        for i, (record, reason) in enumerate(records):
            named = isinstance(record, dict) and isinstance(record.get("id"), str)
            expect(record["id"] if named else f"{name}#0:{i}" if lines else str(i), reason)
    # Image-caption pairs (captions), as JSON lines and as CSV (an extra cell, which csv keys by None, included).
    (images / "noise.png").write_bytes(np.random.default_rng(1).bytes(3000))
    pairs = [({"id": "p_good", "image": "chelsea.png", "caption": "A cat."}, None),
             ({"id": "p_missing", "image": "nope.png", "caption": "Gone."}, IMAGE_MISSING),
             ({"id": "p_noise", "image": "noise.png", "caption": "Noise."}, IMAGE_UNREADABLE),
             ({"id": "p_empty", "image": "coffee.png", "caption": ""}, TEXT_EMPTY),
             ({"id": "p_up", "image": "../secret.png", "caption": "Outside."}, IMAGE_PATH_UNSAFE)]
    rows = [("p_csv_good", "coffee.png,A cup.", None), ("p_csv_extra", "chelsea.png,A cat.,an extra cell", None),
            ("p_csv_empty", "chelsea.png,", TEXT_EMPTY), ("p_csv_missing", "nope.png,Gone.", IMAGE_MISSING)]
    for prefix, keep in (("", lambda reason: True), ("good-", lambda reason: reason is None)):
        (root / f"{prefix}pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r, why in pairs if keep(why)))
        (root / f"{prefix}pairs.csv").write_text("id,image,caption\n" + "".join(f"{key},{cells}\n"
                                                                              for key, cells, why in rows if keep(why)))
        (corpus.good if prefix else corpus.mixed).extend(str(root / f"{prefix}pairs.{ext}") for ext in ("jsonl", "csv"))
    for key, reason in [(r["id"], why) for r, why in pairs] + [(key, why) for key, _, why in rows]:
        expect(key, reason)
    (root / "broken.json").write_text('[{"id": "x", ')
    corpus.mixed.append(str(root / "broken.json"))
    corpus.failed.append(f"{root / 'broken.json'}#0")
    return corpus


def rows_by_key(out: Path, manifest: Manifest) -> dict[str, dict]:
    """Every row of every shard, decoded, by key (each key once), after checking each file against its entry."""
    rows = []
    for entry in manifest.shards:
        assert file_sha256(out / entry.file) == entry.sha256
        table = read_shard(out / entry.file)
        assert table.num_rows == entry.rows
        rows += table.to_pylist()
    by = {row["key"]: row for row in rows}
    assert len(by) == len(rows), "a key written twice"
    return dict(sorted(by.items()))


def listening_addresses(marker: str) -> set[str]:
    """Where this process and every process whose command line holds `marker` accept connections."""
    import psutil

    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.info["pid"] == os.getpid() or marker in " ".join(process.info["cmdline"] or []):
            try:
                found |= {c.laddr.ip.removeprefix("::ffff:") for c in process.net_connections("inet")
                          if c.status == psutil.CONN_LISTEN}
            except psutil.NoSuchProcess:
                continue
    return found


def texts_under(*paths: Path) -> dict[str, str]:
    """Path -> text of these files and of every file under these folders."""
    files = [p for path in paths for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()]
    return {str(p): p.read_bytes().decode("latin-1") for p in files}


@pytest.mark.integration
def test_every_kind_through_ray_job_submit_and_embedded_ray(ray_client, photos, jpeg, tokenizer, tokenizer_dir,
                                                             tmp_path):
    """A corpus of every kind of bad input (tests/integration/test_preprocess.py's and this module's) among good
    records, for understanding: tars, LLaVA JSON and JSON lines, ShareGPT, image-caption pairs (JSON lines, CSV), and a
    tar behind a URL with credentials.
    Run through `ray job submit` on the session's cluster and through an embedded Ray (a separate process): both exit
    0, their manifests are equal (counts per reason, failed files, every shard's rows and sha256) and account for
    every row, each skip reason has its expected count, and the decoded rows of all shards, by key, equal those of a
    run on the good records alone (in files of their own). No credential of the URL reaches an output or a log."""
    from tests.support import REPO, hostile_strings, shard_bytes, skeleton

    user, password, signature = "AKIAUSERSECRET", "PASSWORDSECRET", "SIGNATURESECRET"
    quoted = " ".join(hostile_strings(tokenizer))  # every special token's string, in captions, questions, answers
    served: dict[str, bytes] = {}
    with _Server(served, user, password, signature) as port:
        url, query = f"http://{user}:{password}@127.0.0.1:{port}", f"?X-Amz-Expires=60&X-Amz-Signature={signature}"
        corpus = every_kind(tmp_path / "in", photos, jpeg, quoted, served, url, query)

        def args(inputs: list[str], out: str) -> list[str]:
            return ["understanding", "--input", *inputs, "--output", str(tmp_path / out), "--tokenizer",
                    str(tokenizer_dir), "--image-root", str(corpus.images), "--max-skip-fraction", "1",
                    "--task-tries", "2", "--no-progress"]

        lost = {DIE_ENV: str(tmp_path / "in" / "lost.jsonl")}
        submitted = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_client["dashboard"],
             "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": lost}), "--",
             sys.executable, "-m", "preprocess", *args(corpus.mixed, "submitted")],
            env=ray_client["env"], cwd=REPO, capture_output=True, timeout=400)
        own_ray = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        embedded = subprocess.run([sys.executable, "-m", "preprocess", *args(corpus.mixed, "embedded"), "--cpus", "2"],
                                  env={**own_ray, **lost, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"},
                                  cwd=REPO,
                                  capture_output=True, timeout=400)
    good = main(args(corpus.good, "good"))  # on the session's cluster, through this process's connection

    for done in (submitted, embedded):
        assert done.returncode == 0, (done.stdout + done.stderr).decode()[-4000:]
    assert "succeeded" in submitted.stdout.decode()
    mixed = Manifest.read(tmp_path / "embedded")
    assert Manifest.read(tmp_path / "submitted") == mixed
    assert shard_bytes(tmp_path / "submitted") == shard_bytes(tmp_path / "embedded")

    reasons = Counter(reason for reason in corpus.expected.values() if reason)
    assert mixed.skipped == reasons and set(reasons) == set(SKIP_REASONS)  # every reason the job knows, each counted
    assert mixed.rows_in == len(corpus.expected) == mixed.rows_written + sum(mixed.skipped.values())
    failed = {f["source"]: f["reason"] for f in mixed.files_failed}
    assert sorted(failed) == sorted(corpus.failed)
    assert "unexpected end of data" in failed[str(tmp_path / "in" / "cut-00001.tar")]
    assert "CRC" in failed[str(tmp_path / "in" / "corrupt-00002.tar.gz")]
    assert "FileNotFoundError" in failed[f"http://***@127.0.0.1:{port}/missing.tar?X-Amz-Expires=60&X-Amz-Signature=***"]
    assert "JSONDecodeError" in failed[f"{tmp_path / 'in' / 'broken.json'}#0"]

    rows = rows_by_key(tmp_path / "embedded", mixed)
    assert list(rows) == sorted(key for key, reason in corpus.expected.items() if reason is None)
    assert good.skipped == {} and good.files_failed == [] and good.rows_written == len(rows)
    assert rows == rows_by_key(tmp_path / "good", good)  # every column: key, token ids, loss spans, image bytes

    # Special strings in a caption, a question and an answer are text: the control tokens are exactly those of a
    # record of the same shape without them.
    controls = control_ids(tokenizer)
    for key, like in (("t_quoted", "chelsea"), ("l_quoted", "l_good")):
        assert skeleton(rows[key]["input_ids"], controls) == skeleton(rows[like]["input_ids"], controls), key
    (span,) = rows["l_quoted"]["loss_spans"]
    assert tokenizer.decode(rows["l_quoted"]["input_ids"][span["start"]:span["end"]]) == \
        f" It says {quoted}.{tokenizer.eos_token}"

    # No credential anywhere: the manifests, progress records and shards, what both runs printed, and the logs of the
    # cluster's job driver and workers. Ray's job supervisor writes the command line it runs at the top of the job's
    # log (which `ray job submit` prints): that line is the user's own command, not the job's output.
    logs = Path(ray_client["temp_dir"]) / "session_latest" / "logs"
    texts = {f"{name} {stream}": getattr(done, stream).decode("latin-1") for name, done in
             (("submit", submitted), ("embedded", embedded)) for stream in ("stdout", "stderr")}
    texts |= texts_under(tmp_path / "submitted", tmp_path / "embedded", tmp_path / "good", *logs.glob("job-driver-*"),
                         *logs.glob("worker-*"))
    assert [name for name in texts if "job-driver-raysubmit" in name] and len(texts) > 10
    texts = {name: "\n".join(line for line in text.splitlines() if not line.startswith("Running entrypoint for job "))
             for name, text in texts.items()}
    for secret in (user, password, signature):
        assert not {name: t[max(0, t.index(secret) - 300):][:400] for name, t in texts.items() if secret in t}, secret
    assert "/remote.tar" in json.dumps(mixed.settings["inputs"])  # the inputs are named, redacted

    # The session's cluster, and this process's connection to it, can be reached from this machine only.
    assert listening_addresses(ray_client["temp_dir"]) == {"127.0.0.1"}
