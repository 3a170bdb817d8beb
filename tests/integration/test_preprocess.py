"""preprocess/: real Ray (one `ray start --head` per session, token auth on), real tars, real photographs.

Ray job runs (kept few, the machine has 2 cores): understanding on two tars (photos + a bad-input corpus),
generation on an ImageNet-style folder, text on JSONL, understanding on LLaVA JSON, a killed run and its
resume, two runs whose output is rejected, a run that loses a Ray worker (and its undisturbed twin) and one
embedded Ray started and probed. `ray job submit` runs in tests/integration/test_preprocess_inputs.py, on every kind of
bad input at once.

Tests that start processes or take long here; the in-process ones are in tests/unit/test_preprocess.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import JanusImageProcessor
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.config import preset_config
from model.images import generation_image, pixel_values, psnr
from model.manifest import Manifest, file_sha256, read_shard, weights_fingerprint
from model.sample import samples_from_table
from preprocess.cli import main
from preprocess.job import EXIT_REJECTED, KILL_ENV, PROGRESS_DIR
from tests.support import CAPTIONS, REPO, bad_corpus, encoded, photo_members, shard_bytes, write_tar


@pytest.fixture(scope="module")
def und_inputs(tmp_path_factory, photos) -> dict:
    root = tmp_path_factory.mktemp("und_in")
    members, expected = bad_corpus(photos)
    tars = [write_tar(root / "photos-00000.tar", photo_members(photos)), write_tar(root / "bad-00001.tar", members)]
    return {"tars": [str(t) for t in tars], "expected_bad": expected}


def und_args(und_inputs: dict, tokenizer_dir: Path, out: Path) -> list[str]:
    return ["understanding", "--input", *und_inputs["tars"], "--output", str(out), "--tokenizer", str(tokenizer_dir),
            "--no-progress"]


@pytest.fixture(scope="module")
def und_run(ray_client, und_inputs, tokenizer_dir, tmp_path_factory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("und_out") / "shards"
    return out, main(und_args(und_inputs, tokenizer_dir, out))


def shard_by_source(out: Path, manifest: Manifest, stem: str) -> Path:
    files = [s.file for s in manifest.shards if s.file.startswith(stem)]
    assert len(files) == 1, files
    return out / files[0]


@pytest.mark.integration
def test_understanding_images_equal_janus_processor(und_run, photos, tokenizer, special):
    out, manifest = und_run
    samples = {s.key: s for s in samples_from_table(read_shard(shard_by_source(out, manifest, "photos-00000")))}
    assert sorted(samples) == sorted(Path(n).stem for n in CAPTIONS)
    processor = JanusImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)  # background (127,127,127)
    for name, caption in CAPTIONS.items():
        sample = samples[Path(name).stem]
        stored = np.asarray(Image.open(io.BytesIO(sample.images[0])))
        assert stored.shape == (384, 384, 3)
        # What the tar held (PNG lossless, JPEG re-decoded) through transformers' processor, back to 0..255.
        source = Image.open(io.BytesIO(encoded(photos[name], "JPEG", quality=95))) if name.endswith(".jpg") \
            else photos[name]
        reference = processor(images=source.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        reference = ((reference.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
        assert psnr(stored, reference, peak=255.0) >= 45, name
        width, height = source.size
        if width != height:  # every pad pixel away from the image edge (JPEG blocks) is exactly 127
            pad = (384 - round(384 * min(width, height) / max(width, height))) // 2
            band = (reference[: pad - 8] if width > height else reference[:, : pad - 8])
            stored_band = (stored[: pad - 8] if width > height else stored[:, : pad - 8])
            assert (band == 127).all() and (stored_band == 127).all(), name
        ids = sample.input_ids
        start = ids.index(special.begin_of_image)
        assert ids[start + 1:start + 577] == [special.image_placeholder] * 576
        assert ids[start + 577] == special.end_of_image
        (s, e), = sample.loss_spans
        assert tokenizer.decode(ids[s:e]) == " " + caption + tokenizer.eos_token


@pytest.mark.integration
def test_bad_inputs_are_counted_skips(und_run, und_inputs):
    out, manifest = und_run
    expected = und_inputs["expected_bad"]
    reasons = [r for r in expected.values() if r]
    assert manifest.skipped == {r: reasons.count(r) for r in set(reasons)}
    assert manifest.rows_in == len(CAPTIONS) + len(expected)
    assert manifest.rows_in == manifest.rows_written + sum(manifest.skipped.values())
    written = {s.key: s for s in samples_from_table(read_shard(shard_by_source(out, manifest, "bad-00001")))}
    assert sorted(written) == sorted(k for k, r in expected.items() if r is None)
    for entry in manifest.shards:  # the manifest describes the files exactly
        assert file_sha256(out / entry.file) == entry.sha256
        assert read_shard(out / entry.file).num_rows == entry.rows
    rotated = np.asarray(Image.open(io.BytesIO(written["b07_exif"].images[0])))
    assert (rotated[:, :20] == 127).all() and not (rotated[150:230, 180:200] == 127).all()  # portrait: side pads
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != PROGRESS_DIR) == []
    assert manifest.task == "understanding" and manifest.vq_fingerprint is None


@pytest.fixture(scope="module")
def tiny_vq_dir(tmp_path_factory) -> Path:
    """The tiny preset's VQ with codebook rows of very unequal norms (as trained ones have), saved as a
    JanusVQVAE directory: plain L2 and cosine assignment then disagree, so the test can tell them apart."""
    torch.manual_seed(0)
    vq = JanusVQVAE(preset_config("tiny").vq_config).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.mul_(torch.logspace(-2, 1, vq.config.num_embeddings)[:, None])
    path = tmp_path_factory.mktemp("vq")
    vq.save_pretrained(path)
    return path


@pytest.mark.integration
def test_generation_from_imagenet_folders_is_cosine_nearest(ray_client, tiny_vq_dir, photos, tokenizer,
                                                             tokenizer_dir, special, tmp_path):
    root = tmp_path / "train"
    files = {"n02123045/cat_1.JPEG": "chelsea.png", "n02123045/cat_2.JPEG": "coffee.png",
             "n04266014/rocket_1.JPEG": "rocket.jpg"}
    for rel, name in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        photos[name].convert("RGB").save(root / rel, format="JPEG", quality=95)
    names = tmp_path / "LOC_synset_mapping.txt"
    names.write_text("n02123045 tabby, tabby cat\nn04266014 space shuttle\nn99999999 unused\n")
    out = tmp_path / "gen"
    manifest = main(["generation", "--input", str(root), "--class-names", str(names), "--output", str(out),
                     "--tokenizer", str(tokenizer_dir), "--vq", str(tiny_vq_dir), "--shard-size", "2",
                     "--vq-batch-size", "2", "--no-progress"])
    assert manifest.rows_written == 3 and len(manifest.shards) == 2 and manifest.skipped == {}
    # The two cats share their class's prompt: counted over the job's shards, so a user can see it.
    assert (manifest.distinct_prompts, manifest.rows_sharing_a_prompt) == (2, 2)
    vq = JanusVQVAE.from_pretrained(str(tiny_vq_dir)).eval()
    assert manifest.vq_fingerprint == weights_fingerprint(vq) and manifest.vq_dtype == "float32"
    samples = {s.key: s for e in manifest.shards for s in samples_from_table(read_shard(out / e.file))}
    assert sorted(samples) == sorted(files)
    for rel, sample in samples.items():
        prompt = tokenizer.decode(sample.input_ids[sample.prompt_span[0]:sample.prompt_span[1]])
        assert ("tabby" if "cat" in rel else "space shuttle") in prompt and "," not in prompt
        assert sample.input_ids[0] == special.bos and sample.input_ids[-1] == special.begin_of_image
        assert sample.prompt_span == (1, len(sample.input_ids) - 1)
        with Image.open(root / rel) as im:
            pixels = pixel_values([generation_image(im)])
        with torch.no_grad():  # brute force: cosine against every codebook row
            z = vq.quant_conv(vq.encoder(pixels)).permute(0, 2, 3, 1).reshape(-1, vq.config.embed_dim)
            cos = F.normalize(z, dim=-1) @ F.normalize(vq.quantize.embedding.weight, dim=-1).T
        ids = torch.tensor(sample.image_ids)
        best = cos.argmax(-1)
        # Equal wherever the nearest code is not a float tie (batching may move the last bits).
        top2 = cos.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-5
        assert len(ids) == 576 and torch.equal(ids[clear], best[clear])
        assert (cos.gather(1, ids[:, None]).squeeze(1) >= top2[:, 0] - 1e-5).all()


@pytest.mark.integration
def test_text_jsonl_splits_long_documents(ray_client, tokenizer, tokenizer_dir, special, tmp_path):
    long_doc = " ".join(f"word{i} the quick brown fox" for i in range(3000))  # several 4096-token pieces
    lines = [json.dumps({"text": "A short document."}).encode(), json.dumps({"text": long_doc}).encode(),
             json.dumps({"text": "  "}).encode(), b'{"text": "caf\xe9"}', b"not json",
             json.dumps({"body": "x"}).encode()]
    source = tmp_path / "docs.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "text"
    manifest = main(["text", "--input", str(source), "--output", str(out), "--tokenizer", str(tokenizer_dir),
                     "--shard-size", "4", "--no-progress"])
    assert len(manifest.shards) == 2
    assert manifest.skipped == {"text_empty": 1, "text_not_utf8": 1, "bad_record": 1, "text_missing": 1}
    samples = [s for e in manifest.shards for s in samples_from_table(read_shard(out / e.file))]
    pieces = [s for s in samples if s.key.startswith("docs.jsonl#0:1#")]
    assert len(pieces) >= 3 and all(len(s.input_ids) <= 4096 for s in pieces)
    assert "".join(tokenizer.decode(s.input_ids[1:], skip_special_tokens=True) for s in pieces) == long_doc
    assert [s.input_ids[-1] == special.eos for s in pieces] == [False] * (len(pieces) - 1) + [True]
    assert manifest.rows_in == manifest.rows_written + 4 and manifest.rows_written == 1 + len(pieces)


@pytest.mark.integration
def test_llava_multi_turn_multi_image(ray_client, photos, tokenizer, tokenizer_dir, special, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name in ("chelsea.png", "coffee.png"):
        photos[name].save(images / name)
    data = [
        {"id": "two", "image": ["chelsea.png", "coffee.png"], "conversations": [
            {"from": "human", "value": "<image>\n<image>\nWhat differs?"}, {"from": "gpt", "value": "A cat, a cup."},
            {"from": "human", "value": "Which is warm?"}, {"from": "gpt", "value": "The coffee."}]},
        {"id": "nomarker", "image": "chelsea.png", "conversations": [
            {"from": "human", "value": "What animal?"}, {"from": "gpt", "value": "A cat."}]},
        {"id": "missing", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "broken", "image": "chelsea.png", "conversations": [{"speaker": "x"}]},
    ]
    source = tmp_path / "llava.json"
    source.write_text(json.dumps(data))
    out = tmp_path / "llava"
    manifest = main(["understanding", "--input", str(source), "--image-root", str(images), "--output", str(out),
                     "--tokenizer", str(tokenizer_dir), "--system-prompt", "", "--no-progress"])
    assert manifest.skipped == {"image_missing": 1, "bad_record": 1} and manifest.rows_written == 2
    samples = {s.key: s for s in samples_from_table(read_shard(out / manifest.shards[0].file))}
    two = samples["two"]
    assert len(two.images) == 2 and two.input_ids.count(special.image_placeholder) == 2 * 576
    assert [tokenizer.decode(two.input_ids[s:e]) for s, e in two.loss_spans] == [
        " A cat, a cup." + tokenizer.eos_token, " The coffee." + tokenizer.eos_token]
    assert samples["nomarker"].input_ids.count(special.image_placeholder) == 576


@pytest.mark.integration
def test_killed_run_resumes_to_identical_output(und_run, und_inputs, tokenizer_dir, ray_cluster, tmp_path):
    """SIGKILL the driver while a shard is half written under its temporary name; rerun the same command
    (this time on an embedded Ray): the finished shard is kept, the rest done, output byte-identical."""
    ref_out, ref_manifest = und_run
    out = tmp_path / "resumed"
    env = {**ray_cluster["env"], KILL_ENV: "2"}
    cmd = [sys.executable, "-m", "preprocess", *und_args(und_inputs, tokenizer_dir, out)]
    killed = subprocess.run([*cmd, "--address", ray_cluster["address"]], env=env, cwd=REPO, capture_output=True,
                            timeout=300)
    assert killed.returncode == -9, killed.stderr.decode()[-3000:]
    temporaries = [p.name for p in out.glob(".*.tmp-*")]
    assert len(temporaries) == 1 and not (out / "manifest.json").exists()
    kept = [p for p in out.glob("*.arrow")]
    assert len(kept) == 1
    kept_inode = kept[0].stat().st_ino

    env.pop(KILL_ENV)
    rerun = subprocess.run([*cmd, "--cpus", "1"], env=env, cwd=REPO, capture_output=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()[-3000:]
    assert "1 already done, 1 to do" in rerun.stdout.decode()
    assert kept[0].stat().st_ino == kept_inode  # kept, not rewritten
    assert shard_bytes(out) == shard_bytes(ref_out)
    assert not list(out.glob(".*.tmp-*"))
    manifest = Manifest.read(out)
    assert manifest.shards == ref_manifest.shards and manifest.skipped == ref_manifest.skipped


@pytest.mark.integration
def test_no_rows_or_too_many_skips_exit_3(ray_client, und_inputs, photos, tokenizer_dir, tmp_path, capsys):
    """Exit 3 with the summary, never 0: a corpus of only bad records, then the bad-input corpus (most of it
    skipped). Both keep their manifest; a rerun allowing more skips accepts the second without redoing it."""
    members, expected = bad_corpus(photos)
    bad = {n: d for n, d in members.items() if expected[n.split(".")[0]]}
    n_skipped = sum(1 for reason in expected.values() if reason)
    assert n_skipped > 0.5 * len(expected)
    runs = {"nothing": write_tar(tmp_path / "allbad-00000.tar", bad), "most": Path(und_inputs["tars"][1])}
    outs = {name: tmp_path / name for name in runs}

    def args(name: str, *extra: str) -> list[str]:
        return ["understanding", "--input", str(runs[name]), "--output", str(outs[name]), "--tokenizer",
                str(tokenizer_dir), "--no-progress", *extra]

    for name, why in {"nothing": "no row was written", "most": f"{n_skipped} of {len(expected)} rows skipped"}.items():
        with pytest.raises(SystemExit) as exited:
            main(args(name))
        printed = capsys.readouterr()
        assert exited.value.code == EXIT_REJECTED, printed.err[-2000:]
        assert f"FAILED (exit 3): {why}" in printed.out and f"error: {why}" in printed.err
        manifest = Manifest.read(outs[name])
        assert manifest.rows_in == manifest.rows_written + sum(manifest.skipped.values())
    assert Manifest.read(outs["nothing"]).rows_written == 0
    with pytest.raises(SystemExit) as exited:
        main(args("nothing", "--max-skip-fraction", "1.0"))
    assert exited.value.code == EXIT_REJECTED
    accepted = main(args("most", "--max-skip-fraction", "1.0"))
    assert "1 already done, 0 to do" in capsys.readouterr().out
    # Without a terminal (pytest's captured output), progress comes as lines with counts, here after every batch.
    main(["understanding", "--input", str(runs["most"]), "--output", str(tmp_path / "again"), "--tokenizer",
          str(tokenizer_dir), "--no-progress", "--max-skip-fraction", "1.0", "--progress-every", "0"])
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("progress: ")]
    assert progress and re.search(r"^progress: 1/1 shards, \d+ rows read \(\d+ written, \d+ skipped in finished "
                                  r"shards\), [\d.]+ rows/s, ETA 0\.0 min$", progress[-1]), progress
    assert accepted.rows_written == len(expected) - n_skipped
    assert accepted.shards == Manifest.read(outs["most"]).shards


EMBEDDED_PROBE = """
import json, os, urllib.error, urllib.request
import psutil, ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from preprocess.job import ray_connection

def listening(process):
    try:
        return [c.laddr.ip for c in process.net_connections("inet") if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        return []

def agent_status(port, token):
    request = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Authorization": f"Bearer {token}"}
                                     if token else {})
    try:
        return urllib.request.urlopen(request, timeout=30).status
    except urllib.error.HTTPError as error:
        return error.code

with ray_connection(cpus=1):
    me, node = psutil.Process(), ray.nodes()[0]
    port, token = node["DashboardAgentListenPort"], os.environ["RAY_AUTH_TOKEN"]
    found = {"node_ip": node["NodeManagerAddress"], "gcs": ray.get_runtime_context().gcs_address,
             "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN, "token": token,
             "listening": sorted({ip for p in [me, *me.children(recursive=True)] for ip in listening(p)}),
             "no_token": agent_status(port, ""), "wrong_token": agent_status(port, "0" * 64),
             "right_token": agent_status(port, token)}
found["auth_mode_after"] = os.environ.get("RAY_AUTH_MODE")
print("PROBE " + json.dumps(found))
"""


@pytest.mark.integration
def test_embedded_ray_is_loopback_only_with_token_auth():
    """The embedded Ray's every server listens on 127.0.0.1 only, and it requires a token made for this run,
    even when the environment turned authentication off (restored afterwards)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env.update(RAY_AUTH_MODE="disabled", OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run([sys.executable, "-c", EMBEDDED_PROBE], env=env, cwd=REPO, capture_output=True,
                          timeout=300)
    lines = [line for line in done.stdout.decode().splitlines() if line.startswith("PROBE ")]
    assert done.returncode == 0 and lines, (done.stdout + done.stderr).decode()[-3000:]
    found = json.loads(lines[0].removeprefix("PROBE "))
    assert found["node_ip"] == "127.0.0.1" and found["gcs"].startswith("127.0.0.1:")
    assert found["listening"] and {ip.removeprefix("::ffff:") for ip in found["listening"]} == {"127.0.0.1"}
    assert found["token_auth"] and len(found["token"]) == 64
    home_token = Path.home() / ".ray" / "auth_token"
    assert not home_token.is_file() or home_token.read_text().strip() != found["token"]
    assert (found["no_token"], found["wrong_token"]) == (401, 403) and found["right_token"] not in (401, 403)
    assert found["auth_mode_after"] == "disabled"


def busy_map_workers(raylet_socket: str) -> list[psutil.Process]:
    """Workers of the session's Ray now running one of the job's map tasks (Ray titles a busy worker after its
    task, an idle one `ray::IDLE`): children of the raylet that serves `raylet_socket`."""
    busy = []
    for raylet in psutil.process_iter(["name", "cmdline"]):
        if raylet.info["name"] == "raylet" and raylet_socket in " ".join(raylet.info["cmdline"] or []):
            for worker in raylet.children():
                try:
                    if " ".join(worker.cmdline()).startswith("ray::MapBatches"):
                        busy.append(worker)
                except psutil.NoSuchProcess:
                    continue
    return busy


def kill_a_worker_once_a_shard_is_done(out: Path, raylet_socket: str, job_done: threading.Event,
                                       killed: list[int]) -> None:
    while not job_done.wait(0.01) and len(killed) == 0:  # ends with the job
        if list((out / PROGRESS_DIR).glob("*.json")):
            for worker in busy_map_workers(raylet_socket)[:1]:
                os.kill(worker.pid, signal.SIGKILL)
                killed.append(worker.pid)


@pytest.mark.integration
def test_a_killed_ray_worker_changes_nothing(ray_client, photos, tokenizer_dir, tmp_path):
    """SIGKILL a Ray worker by its pid while it runs a map task, once a shard is written: its task is run
    again, and the output equals an undisturbed run's byte for byte, every row counted once."""
    names = list(CAPTIONS)
    tars = []
    for t in range(8):
        members = {}
        for i in range(3):
            name = names[(t + i) % len(names)]
            members[f"t{t}_{i}.png"] = encoded(photos[name].convert("RGB"), "PNG")
            members[f"t{t}_{i}.txt"] = f"{CAPTIONS[name]} ({t})".encode()
        tars.append(str(write_tar(tmp_path / f"part-{t:05d}.tar", members)))

    def args(out: Path) -> list[str]:
        return ["understanding", "--input", *tars, "--output", str(out), "--tokenizer", str(tokenizer_dir),
                "--no-progress"]

    reference = main(args(tmp_path / "undisturbed"))
    out, job_done, killed = tmp_path / "disturbed", threading.Event(), []
    watcher = threading.Thread(target=kill_a_worker_once_a_shard_is_done,
                               args=(out, ray.nodes()[0]["RayletSocketName"], job_done, killed))
    watcher.start()
    try:
        manifest = main(args(out))
    finally:
        job_done.set()
        watcher.join()
    assert killed, "no worker was running a map task once a shard was done"
    assert shard_bytes(out) == shard_bytes(tmp_path / "undisturbed") and len(shard_bytes(out)) == 8
    assert manifest.shards == reference.shards and manifest.skipped == reference.skipped == {}
    assert manifest.rows_in == manifest.rows_written == 24
    keys = [s.key for e in manifest.shards for s in samples_from_table(read_shard(out / e.file))]
    assert len(set(keys)) == len(keys) == 24
