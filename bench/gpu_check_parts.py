"""The Python steps of bench/gpu_check.sh, one subcommand each (`--help` lists them).

    env OUT.json                      environment facts (Python, torch, CUDA, the GPU, package versions)
    wheels --dir D --target T ...     check the carried wheels against the pins, install them offline, assert versions
    shards --out DIR                  a tokenizer, a tiny model's initial weights and a small corpus (CPU only)
    stage2 --inputs DIR --out RUN     a 1-rank ZeRO-3 Stage II run of a few steps, its checkpoint and its export
    argcheck SCRIPT ARGS...           parse SCRIPT's command line exactly as a run would, then stop (the dry rehearsal)
    record ...                        append one JSON line for a finished part to results.jsonl

Module-level imports stay light (no torch): `record` runs after every part and `wheels` before anything else.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the check reports the versions of (the image's own, before the carried wheels go first on the path).
REPORTED = ("torch", "triton", "transformers", "tokenizers", "safetensors", "huggingface-hub", "pydantic",
            "deepspeed", "flash-attn", "numpy", "pyarrow", "pillow", "pytest", "scikit-image")


def fail(message: str) -> None:
    """One clear line on stderr, then a non-zero exit."""
    print(f"gpu_check: FAILED: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def version_of(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# --- env -------------------------------------------------------------------------------------------------------

def cmd_env(args) -> None:
    facts: dict = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "dry": bool(args.dry),
        "python": sys.version.split()[0],
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "versions": {d: version_of(d) for d in REPORTED},
    }
    try:
        facts["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        facts["nvidia_smi"] = f"unavailable: {e.__class__.__name__}"
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda
        facts["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            facts.update(gpu_name=p.name, gpu_count=torch.cuda.device_count(),
                         gpu_memory_gib=round(p.total_memory / 2**30, 1),
                         gpu_capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
    except Exception as e:  # noqa: BLE001 - a fact, not a failure: the parts say what breaks
        facts["torch_error"] = repr(e)
    text = json.dumps(facts, indent=1, sort_keys=True)
    Path(args.out).write_text(text + "\n")
    print(text)


# --- wheels ----------------------------------------------------------------------------------------------------

def read_pins(path: Path) -> dict[str, str]:
    """name==version lines of a constraints file (comments and other specifiers ignored), names normalised."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)", line)
        if m:
            pins[normalise(m.group(1))] = m.group(2)
    return pins


def carried_wheels(directory: Path) -> dict[str, list[tuple[str, Path]]]:
    """{normalised name: [(version, file)]} of the .whl files in `directory` (wheel names: NAME-VERSION-...)."""
    out: dict[str, list[tuple[str, Path]]] = {}
    for f in sorted(directory.glob("*.whl")):
        parts = f.name[:-4].split("-")
        if len(parts) >= 5:
            out.setdefault(normalise(parts[0]), []).append((parts[1], f))
    return out


def extract_wheels(files: list[Path], target: Path) -> None:
    """pip's job without pip: a wheel is a zip of its install tree (plus NAME.data/{purelib,platlib})."""
    for f in files:
        with zipfile.ZipFile(f) as z:
            z.extractall(target)
        for data in target.glob("*.data"):
            for sub in ("purelib", "platlib"):
                if (data / sub).is_dir():
                    shutil.copytree(data / sub, target, dirs_exist_ok=True)
            shutil.rmtree(data)


def cmd_wheels(args) -> None:
    directory, target = Path(args.dir), Path(args.target)
    pins = read_pins(Path(args.constraints))
    if not directory.is_dir():
        fail(f"no carried wheel folder {directory} (build it with bench/gpu_wheels.sh and carry it)")
    found = carried_wheels(directory)
    problems, expected = [], {}
    for name, optional in [(n, False) for n in args.require] + [(n, True) for n in args.optional]:
        key = normalise(name)
        if optional and key not in found:
            continue
        if key not in pins:
            problems.append(f"{name} has no name==version pin in {args.constraints}")
            continue
        versions = [v for v, _ in found.get(key, [])]
        if not versions:
            if not optional:
                problems.append(f"carried wheel missing: {name}=={pins[key]} (no {key}-*.whl in {directory})")
            continue
        if versions != [pins[key]]:
            problems.append(f"carried wheel of the wrong version: {name} {', '.join(versions)} in {directory}, "
                            f"pinned {pins[key]} in {args.constraints}")
            continue
        expected[key] = pins[key]
    if problems:
        fail("; ".join(problems))
    files = [f for entries in found.values() for _, f in entries]
    target.mkdir(parents=True, exist_ok=True)
    has_pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0
    if has_pip:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(directory),
               "--no-deps", "--disable-pip-version-check", "--root-user-action=ignore", "--no-compile", "--upgrade",
               "--target", str(target),
               *map(str, files)]
        done = subprocess.run(cmd, env={**os.environ, "PIP_NO_INPUT": "1"})
        if done.returncode != 0:
            fail(f"pip install --no-index --target {target} exited {done.returncode}")
    else:
        extract_wheels(files, target)
    # Assert from a fresh interpreter with the target first on the path, as every part will run.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}
    probe = ("import importlib, importlib.metadata as m, json, sys\n"
             "names, imports = json.loads(sys.argv[1]), json.loads(sys.argv[2])\n"
             "out = {}\n"
             "for n in names:\n"
             "    d = m.distribution(n)\n"
             "    out[n] = [d.version, str(d.locate_file(''))]\n"
             "for i in imports:\n"
             "    importlib.import_module(i)\n"
             "print(json.dumps(out))\n")
    run = subprocess.run([sys.executable, "-c", probe, json.dumps(sorted(expected)), json.dumps(args.imports)],
                         env=env, capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"after the install, the version/import check failed: {run.stderr.strip().splitlines()[-1:]}")
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    wrong = [f"{n} {v} from {where} (pinned {expected[n]})" for n, (v, where) in seen.items()
             if v != expected[n] or Path(where).resolve() != target.resolve()]
    if wrong:
        fail("installed versions do not match the pins (is the target first on PYTHONPATH?): " + "; ".join(wrong))
    result = {"installed": {n: v for n, (v, _) in seen.items()}, "wheels": len(files), "installer":
              "pip" if has_pip else "unzip", "optional_absent": [n for n in args.optional if normalise(n) not in
                                                                    expected]}
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    print(json.dumps(result))


# --- shards ----------------------------------------------------------------------------------------------------

def cmd_shards(args) -> None:
    """What the Stage II run reads, built on the CPU: tokenizer/, init/ (a tiny model's weights, transformers
    layout), and one manifest directory per task. Images are drawn (deterministic gradients): no photograph package
    is needed."""
    import random

    import numpy as np
    import torch
    from PIL import Image

    from model.chat_format import Turn, generation_sample, text_sample, understanding_sample
    from model.config import preset_config
    from model.images import encode_image, understanding_image
    from model.janus import JanusProForTraining
    from model.manifest import Manifest, tokenizer_fingerprint, write_shard
    from model.sample import samples_to_table
    from model.tokenizer import SpecialTokens, build_tokenizer, load_tokenizer
    from model.weights import save_checkpoint

    out = Path(args.out)
    if args.init_only:  # the weights beside carried shards: 15 MB not worth carrying, seconds to make
        tokenizer = load_tokenizer(out / "tokenizer")
    else:
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        build_tokenizer(out / "tokenizer")
        tokenizer = load_tokenizer(out / "tokenizer")
    if not args.no_init:
        special = SpecialTokens.from_tokenizer(tokenizer)
        torch.manual_seed(0)
        save_checkpoint(JanusProForTraining(preset_config(args.model, image_token_id=special.image_placeholder)),
                        out / "init", "transformers")
    if args.init_only:
        print(json.dumps({"init": str(out / "init")}))
        return
    rng = random.Random(0)
    grid = np.linspace(0, 255, 320, dtype=np.float32)
    images = []
    for a, b in ((1.0, 0.0), (0.0, 1.0), (0.5, 2.0)):  # three drawn colour gradients
        plane = np.add.outer(grid * a, grid * b) % 256
        pixels = np.stack([plane, plane[::-1], plane.T], -1).astype(np.uint8)
        images.append(encode_image(understanding_image(Image.fromarray(pixels))))
    words = "the a cat dog red blue photo of sky over under bright quick brown fox jumps lazy".split()

    def sentence(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    made = {
        "understanding": [understanding_sample(tokenizer, [Turn("user", f"<image_placeholder>\n{sentence(8)}"),
                                                           Turn("assistant", sentence(rng.randint(2, 40)))],
                                               [images[i % len(images)]], key=f"u{i}") for i in range(12)],
        "generation": [generation_sample(tokenizer, sentence(rng.randint(2, 30)),
                                         [rng.randrange(1024) for _ in range(576)], key=f"g{i}") for i in range(12)],
        "text": [text_sample(tokenizer, sentence(rng.randint(5, 300)), key=f"t{i}") for i in range(16)],
    }
    for task, samples in made.items():
        directory = out / task
        directory.mkdir()
        manifest = Manifest(task=task, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer))
        for k in range(2):
            manifest.shards.append(write_shard(samples_to_table(samples[k::2]), directory / f"{task}-{k:05d}.arrow"))
        manifest.rows_in = manifest.rows_written = len(samples)
        manifest.write(directory)
    print(json.dumps({"shards": str(out), "rows": {t: len(s) for t, s in made.items()}}))


# --- stage2 ----------------------------------------------------------------------------------------------------

def stage2_flags(inputs: Path, run: Path, steps: int) -> list[str]:
    return ["--model", "tiny", "--tokenizer", str(inputs / "tokenizer"), "--init", str(inputs / "init"),
            "--data", *[str(inputs / t) for t in ("understanding", "generation", "text")], "--seq-len", "1400",
            "--rows-per-step", "2", "--train-steps", str(steps), "--save-every", str(steps), "--log-every", "1",
            "--num-workers", "1", "--output", str(run)]


def cmd_stage2(args) -> None:
    inputs, run = Path(args.inputs), Path(args.out)
    missing = [p for p in ("tokenizer", "init", "understanding", "generation", "text") if not (inputs / p).exists()]
    if missing:
        fail(f"Stage II inputs missing under {inputs}: {missing} (bench/gpu_check_parts.py shards --out {inputs})")
    stage2 = [sys.executable, str(REPO / "launchers" / "stage2.py"), *stage2_flags(inputs, run, args.steps)]
    export = [sys.executable, str(REPO / "launchers" / "export.py"), "--checkpoint", str(run), "--out",
              str(run.parent / (run.name + "-export")), "--layout", "transformers"]
    if args.dry:  # the exact command lines, parsed and not run
        for cmd in (stage2, export):
            done = subprocess.run([sys.executable, __file__, "argcheck", *cmd[1:]])
            if done.returncode != 0:
                fail(f"argument check of {Path(cmd[1]).name} exited {done.returncode}")
        print(json.dumps({"stage2": "parsed", "export": "parsed"}))
        return
    import torch  # after the dry branch: the rehearsal needs none of this

    from pipeline.checkpoint import COMPLETE, latest_checkpoint

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": os.environ.get("MASTER_PORT", "29533"),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "DS_ACCELERATOR": "cuda" if torch.cuda.is_available() else "cpu"}
    run.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(stage2, env=env)
    if done.returncode != 0:
        fail(f"Stage II exited {done.returncode}")
    losses = [sum(v for v in json.loads(line)["loss"].values() if v is not None)  # null: a task not trained
              for line in (run / "metrics.jsonl").read_text().splitlines()]
    checkpoint = latest_checkpoint(run)
    if not losses or not all(math.isfinite(x) for x in losses):
        fail(f"Stage II losses not finite: {losses}")
    if checkpoint is None or not (checkpoint / COMPLETE).is_file():
        fail(f"no COMPLETE checkpoint in {run}")
    done = subprocess.run(export, env=env)
    if done.returncode != 0:
        fail(f"export exited {done.returncode}")
    from transformers import JanusForConditionalGeneration

    _, info = JanusForConditionalGeneration.from_pretrained(export[export.index("--out") + 1],
                                                            output_loading_info=True)
    if any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")):
        fail(f"export does not load cleanly in transformers: {info}")
    result = {"losses": losses, "checkpoint": checkpoint.name, "export_loads": True}
    if args.json:
        Path(args.json).write_text(json.dumps(result))
    print(json.dumps(result))


# --- argcheck --------------------------------------------------------------------------------------------------

class _Parsed(Exception):
    pass


def cmd_argcheck(argv: list[str]) -> None:
    """Run SCRIPT as __main__ until its first parse_args succeeds, then stop: the flags a run would use are
    checked by the script's own parser, and nothing else of the run happens."""
    import runpy

    script, rest = argv[0], argv[1:]
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        ns = original(self, args, namespace)
        raise _Parsed(ns)

    argparse.ArgumentParser.parse_args = parse_then_stop
    sys.argv = [script, *rest]
    sys.path.insert(0, str(Path(script).resolve().parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except _Parsed as parsed:
        print(json.dumps({"script": script, "parsed": {k: str(v) for k, v in vars(parsed.args[0]).items()}}))
        return
    finally:
        argparse.ArgumentParser.parse_args = original
    fail(f"{script} finished without parsing a command line")


# --- record ----------------------------------------------------------------------------------------------------

def cmd_record(args) -> None:
    line = {"part": args.part, "config": args.config, "rc": args.rc, "seconds": args.seconds, "cap": args.cap,
            "status": args.status or ("ok" if args.rc == 0 else "timeout" if args.rc in (124, 137) else "failed"),
            "dry": bool(args.dry)}
    if args.result and Path(args.result).is_file():
        text = Path(args.result).read_text()
        try:
            line["result"] = json.loads(text)
        except json.JSONDecodeError:
            line["result_text"] = text[-2000:]
    if args.log and Path(args.log).is_file():
        line["log_tail"] = Path(args.log).read_text(errors="replace")[-1500:]
    with open(args.out, "a") as f:  # one line, appended the moment the part ends
        f.write(json.dumps(line) + "\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "argcheck":  # its arguments are another script's
        cmd_argcheck(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("env")
    p.add_argument("out")
    p.add_argument("--dry", action="store_true")
    p = sub.add_parser("wheels")
    p.add_argument("--dir", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--constraints", required=True)
    p.add_argument("--require", nargs="*", default=[])
    p.add_argument("--optional", nargs="*", default=[])
    p.add_argument("--imports", nargs="*", default=[], help="modules that must import from the installed set")
    p.add_argument("--json")
    p = sub.add_parser("shards")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="tiny")
    p.add_argument("--no-init", action="store_true", help="tokenizer and shards only (what is carried)")
    p.add_argument("--init-only", action="store_true", help="only the initial weights, beside carried shards")
    p = sub.add_parser("stage2")
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--dry", action="store_true")
    p.add_argument("--json")
    sub.add_parser("argcheck", help="SCRIPT ARGS...: parse only")
    p = sub.add_parser("record")
    p.add_argument("--out", required=True)
    p.add_argument("--part", required=True)
    p.add_argument("--config", default="")
    p.add_argument("--rc", type=int, required=True)
    p.add_argument("--seconds", type=float, required=True)
    p.add_argument("--cap", type=int, required=True)
    p.add_argument("--status")
    p.add_argument("--result")
    p.add_argument("--log")
    p.add_argument("--dry", action="store_true")
    args = parser.parse_args()
    {"env": cmd_env, "wheels": cmd_wheels, "shards": cmd_shards, "stage2": cmd_stage2, "record": cmd_record}[
        args.command](args)


if __name__ == "__main__":
    main()
