"""Helpers shared by the tests; the layout of tests/ in brief.

- tests/unit/: fast, in-process tests; `make test-fast` runs them (`-m "not integration"`).
- tests/integration/: tests that start processes (ranks, Ray, Slurm, launchers, the demo) or take over ~10 s.
  Everything under tests/integration/ is marked `integration` (tests/conftest.py adds the mark by path; the
  files also carry `pytestmark`), so `-m "not integration"` and `tests/unit` select the same tests.
- tests/conftest.py: session-scoped fixtures shared by both folders (one corpus, one tokenizer, one tiny
  checkpoint, one Ray cluster).
- tests/support.py (this module): REPO and every helper more than one test module uses (the rank launcher,
  tar and checkpoint builders, ...). A test module imports helpers from here, never from another test module.
- tests/slurm_harness.py: a local one-node Slurm cluster for tests/integration/test_slurm.py.
- tests/ranks/: per-rank scripts that tests start as subprocesses (`run_ranks(rank_script(name, args))`).

The rank launcher runs a script on N local CPU ranks (gloo), the way the deepspeed launcher sets them up.
Per-rank scripts live in tests/ranks/: each takes one JSON argument, prints what the test checks, and exits 0
on success. Start one with `run_ranks(rank_script(name, args))`, or `Ranks(...)` to watch it while it runs.
"""
from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

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

    def __init__(self, args: list[str], world_size: int = 2, env: dict | None = None):
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
                                               stderr=subprocess.STDOUT, text=True))

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
    """Total loss per step from metrics.jsonl (the last record of a step wins, as after a resume)."""
    out = {}
    for line in (output / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        out[r["step"]] = sum(v for v in r["loss"].values())
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
