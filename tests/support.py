"""Helpers shared by the tests; the layout of tests/ in brief.

- tests/unit/: fast, in-process tests; `make test-fast` runs them.
- tests/integration/: tests that start processes (ranks, Ray, Slurm, launchers, the demo) or take over ~10 s.
  Everything under tests/integration/ is marked `integration` (tests/conftest.py adds the mark by path, and
  refuses a test marked `integration` under tests/unit/), so `-m "not integration"` and `tests/unit` select the
  same tests. A module whose tests are of both kinds is two files of one name, tests/unit/test_X.py and
  tests/integration/test_X.py (both folders are packages, so the names do not clash).
- tests/conftest.py: session-scoped fixtures shared by both folders (one corpus, one tokenizer, one tiny
  checkpoint, one Ray cluster).
- tests/support.py (this module): REPO and every helper more than one test module uses (the rank launcher,
  tar and checkpoint builders, ...). A test module imports helpers from here, never from another test module;
  a fixture more than one module uses goes in tests/conftest.py.
- tests/slurm_harness.py: a local one-node Slurm cluster for tests/integration/test_slurm.py.
- tests/ranks/: per-rank scripts that tests start as subprocesses (`run_ranks(rank_script(name, args))`).

The rank launcher runs a script on N local CPU ranks (gloo), the way the deepspeed launcher sets them up.
Per-rank scripts live in tests/ranks/: each takes one JSON argument, prints what the test checks, and exits 0
on success. Start one with `run_ranks(rank_script(name, args))`, or `Ranks(...)` to watch it while it runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

if TYPE_CHECKING:
    from pipeline.config import DataConfig

REPO = Path(__file__).resolve().parents[1]  # the repository root: the one definition
RANK_SCRIPTS = REPO / "tests" / "ranks"


def rank_script(name: str, args: dict) -> list[str]:
    """The command line of tests/ranks/`name` with its one JSON argument."""
    path = RANK_SCRIPTS / name
    if not path.is_file():  # a missing script would otherwise surface as N rank tracebacks
        raise FileNotFoundError(path)
    return [str(path), json.dumps(args)]


def free_ports(n: int) -> list[int]:
    """n distinct ports the OS reports free right now (bound together so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


class Ranks:
    """N rank processes of one job; output goes to files (a rank blocked on a full pipe would stall its peers)."""

    def __init__(self, args: list[str], world_size: int = 2, env: dict | None = None, cwd: Path | None = None):
        port = free_port()
        self.procs, self.logs = [], []
        self.finished: list[str] | None = None  # every rank's output, kept once the job has ended
        for rank in range(world_size):
            rank_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                        "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size),
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                        **(env or {})}
            self.logs.append(tempfile.NamedTemporaryFile(mode="w+", suffix=f".rank{rank}.log"))
            self.procs.append(subprocess.Popen([sys.executable, *args], env=rank_env, stdout=self.logs[-1],
                                               stderr=subprocess.STDOUT, text=True, cwd=cwd))

    def output(self, rank: int) -> str:
        if self.finished is not None:
            return self.finished[rank]
        return Path(self.logs[rank].name).read_text()

    def wait_for(self, rank: int, text: str, timeout: float) -> None:
        """Until `text` appears in a rank's output; fails if the job ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while text not in self.output(rank):
            if time.monotonic() > deadline or all(p.poll() is not None for p in self.procs):
                self.kill()
                raise AssertionError(f"{text!r} never appeared on rank {rank}:\n{self.output(rank)[-4000:]}")
            time.sleep(0.2)

    def signal(self, rank: int, signum: int) -> None:
        self.procs[rank].send_signal(signum)

    def kill(self) -> None:
        """What a launcher does when one rank dies: kill the rest."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()

    def wait(self, timeout: float) -> list[str]:
        """Every rank's output once all exit; fails on timeout or a non-zero exit."""
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
        finally:
            self.kill()
        outputs = [self.output(r) for r in range(len(self.procs))]
        self.finished = outputs
        for log in self.logs:
            log.close()
        for rank, (p, out) in enumerate(zip(self.procs, outputs, strict=True)):
            if p.returncode != 0:
                raise AssertionError(f"rank {rank} exited {p.returncode}:\n{out[-4000:]}")
        return outputs


def run_ranks(args: list[str], world_size: int = 2, timeout: float = 300, env: dict | None = None) -> list[str]:
    """Start `python args...` once per rank; return each rank's output. Fails on timeout or non-zero exit."""
    return Ranks(args, world_size, env).wait(timeout)


# Tars of photographs and hard cases, as img2dataset writes them (preprocess tests, Slurm tests).
CAPTIONS = {
    "astronaut.png": "An astronaut in a white suit smiles in front of a flag.",
    "chelsea.png": "A brown tabby cat with green eyes looks to the side.",
    "coffee.png": "A cup of coffee on a saucer with a spoon.",
    "rocket.jpg": "A rocket lifts off from its launch pad.",
    "motorcycle_left.png": "A red motorcycle parked in a room.",
    "hubble_deep_field.jpg": "Hundreds of distant galaxies in deep space.",
}


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    """A webdataset tar as img2dataset writes it: members in key order, key.ext names."""
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return path


def bad_corpus(photos: dict[str, Image.Image]) -> tuple[dict[str, bytes], dict[str, str | None]]:
    """Members of a tar of hard cases, and what each key must become (a skip reason, or None: written)."""
    astro, cat = photos["astronaut.png"].convert("RGB"), photos["chelsea.png"]
    jpeg = encoded(astro, "JPEG", quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 on display, so the 451x300 cat becomes portrait
    rgba = cat.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(cat.size))
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 0
    sixteen = Image.fromarray(np.asarray(photos["camera.png"], dtype=np.uint16) * 257)  # mode I;16
    cases = {
        "b00_zero": ("jpg", b"", "A photo.", "image_empty"),
        "b01_truncated": ("jpg", jpeg[: len(jpeg) // 2], "A photo.", "image_corrupt"),
        "b02_random": ("jpg", np.random.default_rng(0).bytes(5000), "A photo.", "image_unreadable"),
        "b03_huge": ("png", encoded(Image.new("1", (9500, 9500)), "PNG"), "A photo.", "image_too_large"),
        "b04_tiny": ("png", encoded(Image.new("RGB", (1, 1), (200, 0, 0)), "PNG"), "A photo.", "image_too_small"),
        "b05_16bit": ("png", encoded(sixteen, "PNG"), "A camera man.", None),
        "b06_cmyk": ("jpg", encoded(astro.convert("CMYK"), "JPEG", quality=95), "An astronaut.", None),
        "b07_exif": ("jpg", encoded(cat.convert("RGB"), "JPEG", quality=95, exif=exif), "A cat.", None),
        "b08_rgba": ("png", encoded(rgba, "PNG"), "A fading cat.", None),
        "b09_palette": ("png", encoded(palette, "PNG"), "A cat in 16 colours.", None),
        "b10_latin1": ("jpg", jpeg, "Caf\xe9 cr\xe8me".encode("latin-1"), "text_not_utf8"),
        "b11_empty_caption": ("jpg", jpeg, "   ", "text_empty"),
        "b12_long_caption": ("jpg", jpeg, "the quick brown fox " * 2000, "too_long"),
        "b13_no_image": (None, b"", "A caption without its image.", "image_missing"),
    }
    members, expected = {}, {}
    for key, (ext, data, caption, reason) in cases.items():
        if ext:
            members[f"{key}.{ext}"] = data
        members[f"{key}.txt"] = caption if isinstance(caption, bytes) else caption.encode()
        expected[key] = reason
    return members, expected


def photo_members(photos: dict[str, Image.Image]) -> dict[str, bytes]:
    """The captioned photographs as img2dataset writes them: key.jpg|png, key.txt and key.json."""
    good = {}
    for name, caption in CAPTIONS.items():
        key = Path(name).stem
        ext = "jpg" if name.endswith(".jpg") else "png"
        good[f"{key}.{ext}"] = encoded(photos[name], "JPEG" if ext == "jpg" else "PNG", **(
            {"quality": 95} if ext == "jpg" else {}))
        good[f"{key}.txt"] = caption.encode()
        good[f"{key}.json"] = json.dumps({"url": f"http://example.com/{name}", "caption": caption}).encode()
    return good


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.arrow"))}


# Training runs: launcher arguments and what a run leaves behind.
STAGE_LAUNCHER = str(REPO / "launchers" / "stage{}.py")


def stage_args(stage: int, corpus, tokenizer_dir, output, init, *extra: str, tasks=None) -> list[str]:
    tasks = tasks or ["understanding", "generation"] + (["text"] if stage > 1 else [])
    return [STAGE_LAUNCHER.format(stage), "--model", "tiny", "--tokenizer", str(tokenizer_dir), "--output", str(output),
            "--data", *[str(corpus[t]) for t in tasks], "--init", str(init), "--seq-len", "1400",
            "--rows-per-step", "2", "--log-every", "1", "--num-workers", "1", *extra]


def losses(output: Path) -> dict[int, float]:
    """Total loss per step from metrics.jsonl (the last record of a step wins, as after a resume); a task the step
    did not train is null there."""
    out = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = sum(v for v in r["loss"].values() if v is not None)
    return out


def tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    from model.weights import read_entries

    return {k: e.read() for k, e in read_entries(checkpoint).items()}


def consolidated(run: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.checkpoint import latest_checkpoint

    latest = latest_checkpoint(run)
    return get_fp32_state_dict_from_zero_checkpoint(str(latest.parent), tag=latest.name)


def fake_checkpoint(root: Path, step: int, files: dict[str, bytes], ours: bool = True) -> Path:
    from pipeline.checkpoint import COMPLETE, WRITER, file_records

    path = root / "checkpoints" / f"step-{step:08d}"
    for name, data in files.items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_bytes(data)
    marker = {"writer": WRITER, "step": step, "world_size": 1, "files": file_records(path)} if ours else \
        {"step": step, "world_size": 1}
    (path / COMPLETE).write_text(json.dumps(marker))
    return path


# A real Encapsulated PostScript file: Pillow identifies it by content, whatever the member is called, and loading it
# runs Ghostscript on the data.
MINIMAL_EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
               b"newpath 0 0 moveto 64 64 lineto stroke\nshowpage\n%%EOF\n")


# The chat format's special strings (sample format tests, preprocess input tests).
def hostile_strings(tokenizer) -> list[str]:
    """The string of every special and added token the tokenizer has, and of every token the format writes."""
    from model.tokenizer import FORMAT_TOKENS

    return sorted({t.content for t in tokenizer.added_tokens_decoder.values()} | set(FORMAT_TOKENS))


def skeleton(ids: list[int], controls: frozenset[int]) -> list:
    """The control tokens in order, each run of text tokens between them collapsed to one "text"."""
    out: list = []
    for tid in ids:
        if tid in controls:
            out.append(tid)
        elif not out or out[-1] != "text":
            out.append("text")
    return out


# The packages of ours, as the wheel ships them (package tests).
PACKAGES = ("model", "pipeline", "preprocess", "launchers", "ds_configs")  # what the wheel ships


# The data pipeline's settings over a corpus of shards (data path tests).
def make_config(corpus, ratio=(2, 3, 5), **overrides) -> DataConfig:
    from model.sample import TASKS
    from pipeline.config import DataConfig

    manifests = [str(corpus[t]) for t, r in zip(TASKS, ratio, strict=True) if r > 0]
    defaults = dict(data=manifests, ratio=list(ratio), seq_len=2048, rows_per_micro_batch=2, buffer_size=16,
                    max_age=8, seed=3, num_workers=2, prefetch=2)
    return DataConfig(**{**defaults, **overrides})


# Run directories and user mistakes for the config checks (config tests).
def corpus_flags(corpus: dict[str, Path]) -> list[str]:
    return ["--data", *(str(corpus[t]) for t in ("understanding", "text", "generation"))]


def run_to_resume(path: Path, stage: int, flags: list[str]) -> Path:
    """A run directory as training leaves it: its config.yaml and a complete checkpoint this code wrote."""
    from pipeline.config import resolve

    config, _ = resolve(stage, [*flags, "--output", str(path)])
    fake_checkpoint(path, 2, {"rank-0.pt": b"state"})
    config.save(path / "config.yaml")
    return path


def mistakes(corpus: dict[str, Path], tokenizer_dir: Path, made: dict[str, Path], tmp: Path
             ) -> dict[str, tuple[list[str], str]]:
    """name -> (stage 2 flags, text the error line must hold)."""
    data = corpus_flags(corpus)
    ok = ["--model", "tiny", "--tokenizer", str(tokenizer_dir), *data, "--output", str(tmp / "run")]
    other_tokenizer, torn = made["other-tok"], made["torn"]
    return {
        "abbreviation": ([*ok, "--learn", "1e-3"], "--learn: did you mean --learning-rate?"),
        "typo": ([*ok, "--warmup-step", "5"], "did you mean --warmup-steps"),
        "bad choice": ([*ok, "--lr-decay-style", "cosin"], "--lr-decay-style"),
        "attention": ([*ok, "--attention", "flash"], "--attention"),
        "flash on cpu": ([*ok, "--attention", "varlen"], "--attention varlen: needs a CUDA GPU"),
        "no model": (["--tokenizer", str(tokenizer_dir), *data], "--model: give a preset"),
        "no tokenizer": (["--model", "tiny", *data], "--tokenizer: needed"),
        "wrong tokenizer": ([*ok, "--tokenizer", str(other_tokenizer)], f"--tokenizer {other_tokenizer}: cannot"),
        "missing tokenizer": ([*ok, "--tokenizer", str(tmp / "nope")], "no such directory"),
        "no data": (ok[:4], "--data: at least one manifest"),
        "mistyped data": ([*ok, "--data", str(tmp / "shards" / "und")], "--data " + str(tmp / "shards" / "und")),
        "missing shards": ([*ok, "--data", str(corpus["understanding"]), str(corpus["generation"]), str(torn),
                            "--ratio", "1", "1", "1"], "shard(s) missing or not of their recorded size, e.g. "),
        "truncated shard": ([*ok, "--data", str(corpus["understanding"]), str(corpus["generation"]),
                             str(made["truncated"])], "bytes, not "),
        "ratio without data": ([*ok, "--data", str(corpus["understanding"])], "asks for text, generation data"),
        "missing init": ([*ok, "--init", str(tmp / "runs" / "stage1")], "--init"),
        "missing resume": ([*ok, "--resume", str(tmp / "step-7")], "--resume"),
        "impossible batch": ([*ok, "--rows-per-step", "3", "--rows-per-micro-batch", "2"], "--rows-per-step 3"),
        "decay before warm-up": ([*ok, "--warmup-steps", "10", "--lr-decay-steps", "5"], "--lr-decay-steps"),
        "bad ds config": ([*ok, "--ds-config", "zero3_gpu"], "--ds-config zero3_gpu: neither a JSON file"),
        "not trainable": ([*ok, "--trainable", "llm", "gen_encoder"], "--trainable: cannot train ['gen_encoder']"),
        "other tokenizer's shards": ([*ok, "--data", str(corpus["understanding"]), str(corpus["text"]),
                                      str(made["retokenized"])], "made with another tokenizer"),
        "resume another stage": ([*ok, "--output", str(made["stage1-run"])], "was trained with other settings: "
                                 "stage 1 -> 2"),
        "collective timeout after the watchdog": ([*ok, "--collective-timeout-seconds", "3600"],
                                                  "--collective-timeout-seconds: must be positive and below"),
        "foreign checkpoint": ([*ok, "--output", str(made["foreign"])], "--resume auto: " + str(made["foreign"])),
        "other VQ's shards": ([*ok, "--init", str(made["init"]), "--data", str(corpus["understanding"]),
                               str(corpus["text"]), str(made["other-vq"])], "made with another VQ"),
    }


# Tar members and tars built in memory (preprocess input tests).
CAPTION = "A brown tabby cat with green eyes looks to the side."


def samples(keys: list[str], jpeg: bytes) -> dict[str, bytes]:
    """Tar members of good caption samples, img2dataset style."""
    members = {}
    for key in keys:
        members[f"{key}.jpg"] = jpeg
        members[f"{key}.txt"] = f"{CAPTION} ({key})".encode()
    return members


def member_offsets(data: bytes) -> dict[str, tuple[int, int]]:
    """(header offset, data offset) of each member of a tar."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data) for m in tar.getmembers()}


def tar_bytes(members: dict[str, bytes] | list, mode: str = "w") -> bytes:
    """A tar (`mode` w:gz for gzip) of these members in order: (name, bytes) files, or TarInfo entries (folders,
    links, from `folder` and `symlink`); a list may name a member twice."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for member in (members.items() if isinstance(members, dict) else members):
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
                continue
            name, data = member
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def folder(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = tarfile.DIRTYPE, 0
    return info


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, 0
    return info


CONVERSATION = [{"from": "human", "value": "<image>\nWhat animal is this?"}, {"from": "gpt", "value": "A cat."}]


# Host-sync recorders (host sync tests, unit and on ranks): tests/unit/ and tests/integration/test_host_syncs.py.
aten = torch.ops.aten


# Ops whose result (or its size) the host must read: item/bool/int/float, data-dependent output sizes,
# bincount, whose GPU kernel sizes its output from the input's max even when given minlength, and
# masked_scatter's backward, a masked_select inside one op.
SYNCING = {aten._local_scalar_dense.default, aten.is_nonzero.default, aten.nonzero.default, aten.argwhere.default,
           aten.masked_select.default, aten.bincount.default, aten.unique_consecutive.default,
           aten._unique2.default, aten.unique_dim.default, aten.repeat_interleave.Tensor,
           aten.masked_scatter_backward.default}


# Indexing ops that sync only when an index is a boolean mask (it becomes indices by a nonzero).
INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}


# Reads of a tensor's data that dispatch no op of their own (`cpu` of a CPU tensor returns it; on a GPU it copies).
READS = (torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.cpu)


def _has_mask_index(args) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or [])


def whose(stack: traceback.StackSummary) -> tuple[str, str]:
    """("deepspeed" or "ours", file:line function): the innermost frame of DeepSpeed's or of ours (model/,
    pipeline/) that asked for the sync. A sync in the autograd graph's backward shows DeepSpeed's
    `engine.backward`, which runs it: the model's own backward is checked without DeepSpeed below."""
    for frame in reversed(stack):
        path = Path(frame.filename)
        if "deepspeed" in path.parts:
            inside = "/".join(path.parts[path.parts.index("deepspeed") + 1:])
            return "deepspeed", f"{inside}:{frame.lineno} {frame.name}"
        if path.is_relative_to(REPO) and path.relative_to(REPO).parts[0] in ("model", "pipeline"):
            return "ours", f"{path.relative_to(REPO)}:{frame.lineno} {frame.name}"
    return "ours", "?"


class HostSyncs(TorchDispatchMode):
    """The syncing aten ops run while active, by name; with a `clock` (the step now), also by step and whose."""

    def __init__(self, clock: Callable[[], int] | None = None):
        super().__init__()
        self.seen: list[str] = []
        self.clock, self.sites = clock, []

    def record(self, name: str) -> None:
        self.seen.append(name)
        if self.clock is not None:
            who, site = whose(traceback.extract_stack())
            self.sites.append({"step": self.clock(), "who": who, "op": name, "site": site})

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or (func in INDEXING and _has_mask_index(args)):
            self.record(str(func))
        return func(*args, **(kwargs or {}))


class HostReads(TorchFunctionMode):
    def __init__(self, record: Callable[[str], None]):
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS:
            self.record(func.__name__)
        return func(*args, **(kwargs or {}))


# ---- a forged checkpoint: a real one whose DeepSpeed file also carries a pickle payload, re-listed in its COMPLETE
# as anyone who can write a run directory could (the trust model's tests) ----

class Payload:
    """Unpickled, it creates `marker` (the side effect a test looks for): pickle calls open(marker, "w")."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def with_payload(file: Path, marker: Path) -> None:
    """`file` (a torch.save'd dict) with one more entry that, unpickled, creates `marker`."""
    from pipeline.safe_load import ALLOWED

    with torch.serialization.safe_globals(ALLOWED):
        state = torch.load(file, weights_only=True)
    torch.save({**state, "note": Payload(marker)}, file)


def relisted(step: Path) -> None:
    """Its COMPLETE rewritten as this code writes it, listing the files as they now are."""
    from pipeline.checkpoint import COMPLETE, WRITER, file_records

    marker = json.loads((step / COMPLETE).read_text())
    (step / COMPLETE).write_text(json.dumps({**marker, "writer": WRITER, "files": file_records(step)}))


def forged_run(run: Path, to: Path, marker: Path) -> Path:
    """A copy of run `run` at `to` whose latest checkpoint's model states carry a payload; its COMPLETE lists them."""
    from pipeline.checkpoint import latest_checkpoint

    shutil.copytree(run, to)
    step = latest_checkpoint(to)
    with_payload(sorted(step.glob("*model_states.pt"))[0], marker)
    relisted(step)
    return to


# A Hugging Face hub cache on disk (released weights by hub id, without the network): tests/unit/test_hub.py,
# tests/integration/test_quickstart.py.
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo_id: str, *folders: Path, commit: str = COMMIT) -> Path:
    """`folders`' files as hub repository `repo_id` in the cache at `cache`, laid out as huggingface_hub lays it
    out (file names are symlinks into blobs/); returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if file.is_file():
                blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
                shutil.copyfile(file, blob)
                (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
