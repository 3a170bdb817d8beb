"""`python -m preprocess {understanding,generation,text} --input ... --output DIR --tokenizer DIR [options]`.

Exit codes: 0 done; 2 a usage or configuration mistake (one `error: --flag ...` line, before any work);
3 the job wrote no row or skipped more than --max-skip-fraction of its rows (the summary says which; the
manifest is still written).
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path

from model.chat_format import JANUS_SYSTEM_PROMPT
from model.config import DTYPES
from model.hub import HubError, resolve_weights
from model.manifest import Manifest
from model.sample import GENERATION, TASKS, TEXT, UNDERSTANDING
from preprocess.job import (
    DEFAULT_MAX_SKIP_FRACTION,
    DEFAULT_TASK_TRIES,
    EXIT_REJECTED,
    EXIT_USAGE,
    VQ_BATCH_SIZE,
    JobConfig,
    JobRejected,
    UsageError,
    run,
)
from preprocess.records import DEFAULT_INSTRUCTIONS, ConvertConfig
from preprocess.sources import FORMATS

# What each task reads: its input formats, and the flags that act on it alone (the rest act on every task). The
# help's per-task list is made from this; tests/unit/test_preprocess.py checks that it names every flag and format.
TASK_INPUTS = {
    UNDERSTANDING: (("wds", "llava", "sharegpt", "captions"),
                    ("--image-root", "--instructions", "--system-prompt", "--image-format", "--max-pixels",
                     "--min-image-size"),
                    "a conversation about the image(s), or for caption-only data (a tar's key.txt, captions) an "
                    "--instructions line answered by the caption"),
    GENERATION: (("wds", "imagenet", "captions"),
                 ("--vq", "--vq-dtype", "--vq-batch-size", "--vq-actors", "--vq-actors-per-gpu", "--vq-channels-last",
                  "--image-root", "--class-names", "--max-pixels", "--min-image-size"),
                 "one image and its caption (ImageNet: its category name), the prompt"),
    TEXT: (("jsonl",), ("--text-field",), "JSON lines, a document in each; longer ones cut into context-sized pieces"),
}


def task_epilog(task: str | None = None) -> str:
    """The per-task list at the end of --help: every task's, or `task`'s alone (`python -m preprocess TASK -h`)."""
    lines = ["per task (flags not named under a task act on every task):"]
    for name, (formats, flags, what) in TASK_INPUTS.items():
        if task in (None, name):
            lines += [wrap(f"{name}: {what}", "  "), wrap(f"input formats: {', '.join(formats)}", "    "),
                      wrap(f"its flags: {' '.join(flags)}", "    ")]
    return "\n".join(lines)


def wrap(text: str, indent: str) -> str:
    return textwrap.fill(text, 100, initial_indent=indent, subsequent_indent=indent + "  ", break_on_hyphens=False,
                         break_long_words=False)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, and the description and per-task list kept as written (not refilled into one paragraph)."""


def parser(task: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess", description=__doc__, epilog=task_epilog(task),
                                formatter_class=HelpFormatter)
    p.add_argument("task", choices=TASKS, help="what the rows become; its input formats and flags are listed below")
    p.add_argument("--input", nargs="+", required=True,
                   help="tars (paths, fsspec URLs, {000..099} patterns), LLaVA/ShareGPT/captions .json or .jsonl, "
                        "captions .csv, text .jsonl, or an ImageNet root")
    p.add_argument("--output", required=True, help="output directory (absolute under `ray job submit`)")
    p.add_argument("--tokenizer", required=True,
                   help="a folder AutoTokenizer.from_pretrained loads, with the Janus tokens, or a hub id "
                        "(deepseek-ai/Janus-Pro-1B: its cached snapshot, downloaded unless HF_HUB_OFFLINE)")
    p.add_argument("--input-format", default="auto", choices=("auto", *FORMATS),
                   help="auto: from each input's name (.tar, .csv, a folder) and, for .json/.jsonl, its first record "
                        "(conversations: llava, messages: sharegpt, image and caption: captions, else jsonl); "
                        "else read every input as this format")
    p.add_argument("--vq", default="",
                   help="generation: a JanusVQVAE directory or a Janus checkpoint: a folder or a hub id (as "
                        "--tokenizer)")
    p.add_argument("--vq-dtype", default="float32", choices=sorted(DTYPES),
                   help="generation: the dtype the VQ encoder runs in (the manifest records it)")
    p.add_argument("--vq-batch-size", type=int, default=VQ_BATCH_SIZE,
                   help="generation: images per VQ forward pass in an actor (bench/vq.py)")
    p.add_argument("--vq-actors", type=int, default=0,
                   help="VQ actors in all; 0: --vq-actors-per-gpu on each GPU, else a quarter of the CPUs")
    p.add_argument("--vq-actors-per-gpu", type=int, default=1, help="VQ actors sharing one GPU (bench/vq.py)")
    p.add_argument("--vq-channels-last", action="store_true", help="run the VQ's convolutions channels-last")
    p.add_argument("--image-root", default="",
                   help="LLaVA/ShareGPT/captions: the folder image paths are relative to; '': each input file's own")
    p.add_argument("--class-names", default="", help="ImageNet: wnid -> name (.txt lines or .json)")
    p.add_argument("--text-field", default="text", help="JSONL: the field holding the document")
    p.add_argument("--instructions", default="",
                   help="caption-only understanding data: a file of instructions, one a line")
    p.add_argument("--system-prompt", default=JANUS_SYSTEM_PROMPT, help="understanding; '' for none")
    p.add_argument("--shard-size", type=int, default=10_000,
                   help="rows per output shard for LLaVA/ShareGPT/captions/ImageNet/JSONL (a tar is always one shard)")
    p.add_argument("--image-format", default="webp", choices=("webp", "png", "jpeg"),
                   help="stored understanding images: webp/png are lossless (exact); jpeg (q98 4:4:4) is an opt-in "
                        "smaller (docs/benchmarks.md) but lossy: 44-48 dB on real photos, below 45 dB on some")
    p.add_argument("--context", type=int, default=ConvertConfig.context,
                   help="tokens a sample may hold: a longer sample is skipped (too_long), a longer text document cut "
                        "into pieces")
    p.add_argument("--max-pixels", type=int, default=ConvertConfig.max_pixels,
                   help="an image of more pixels is skipped (image_too_large), read from its header before decoding")
    p.add_argument("--min-image-size", type=int, default=ConvertConfig.min_image_size,
                   help="an image with a shorter side is skipped (image_too_small)")
    p.add_argument("--cpus", type=int, default=None, help="embedded Ray: CPUs to use (default all)")
    p.add_argument("--gpus", type=int, default=None, help="embedded Ray: GPUs to use (default all)")
    p.add_argument("--address", default="", help="join this Ray cluster instead of starting an embedded one")
    p.add_argument("--max-skip-fraction", type=float, default=DEFAULT_MAX_SKIP_FRACTION,
                   help="exit 3 when more than this fraction of the rows is skipped (1.0: never); a job that "
                        "writes no row exits 3 whatever this says")
    p.add_argument("--task-tries", type=int, default=DEFAULT_TASK_TRIES,
                   help="runs of one input's task (its worker died, e.g. killed for memory) before the input is listed "
                        "in files_failed, its records counted as input_lost, and the job goes on")
    p.add_argument("--no-progress", action="store_true", help="no Ray Data progress bars (shown on a terminal only)")
    p.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                   help="seconds between progress lines: shards done, rows read / written / skipped, rows/s, ETA "
                        "(0: after every batch)")
    return p


def read_instructions(path: str) -> tuple[str, ...]:
    if not path:
        return DEFAULT_INSTRUCTIONS
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--instructions {path}: {error}") from None
    lines = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        raise UsageError(f"--instructions {path} holds no instruction")
    return lines


def vq_dtype_name(name: str) -> str:
    """torch's spelling of a --vq-dtype (`bf16` -> `bfloat16`): the manifest and the resume guard record one name."""
    return str(DTYPES[name]).removeprefix("torch.")


def config_from_args(args: argparse.Namespace) -> JobConfig:
    for flag in ("shard_size", "vq_batch_size", "vq_actors_per_gpu", "task_tries"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 1")
    if args.vq_actors < 0:
        raise UsageError("--vq-actors must be >= 0 (0: --vq-actors-per-gpu on each GPU)")
    if not args.progress_every >= 0:  # NaN too
        raise UsageError("--progress-every must be >= 0 (seconds; 0: after every batch)")
    if not 0 <= args.max_skip_fraction <= 1:
        raise UsageError(f"--max-skip-fraction {args.max_skip_fraction:g}: give a fraction from 0 to 1")
    try:  # a hub id becomes its snapshot folder here, once: Ray's workers then read that folder
        tokenizer = str(resolve_weights(args.tokenizer, "--tokenizer"))
        vq = str(resolve_weights(args.vq, "--vq")) if args.vq else ""
    except HubError as error:
        raise UsageError(str(error)) from None
    convert = ConvertConfig(task=args.task, tokenizer=tokenizer, context=args.context,
                            image_format=args.image_format, max_pixels=args.max_pixels,
                            min_image_size=args.min_image_size, instructions=read_instructions(args.instructions),
                            system_prompt=args.system_prompt or None, text_field=args.text_field)
    return JobConfig(inputs=args.input, output=args.output, convert=convert, input_format=args.input_format,
                     shard_size=args.shard_size, image_root=args.image_root, class_names=args.class_names,
                     vq=vq, vq_dtype=vq_dtype_name(args.vq_dtype), vq_batch_size=args.vq_batch_size,
                     vq_actors=args.vq_actors, vq_actors_per_gpu=args.vq_actors_per_gpu,
                     vq_channels_last=args.vq_channels_last, cpus=args.cpus, gpus=args.gpus, address=args.address,
                     progress=not args.no_progress, progress_every_s=args.progress_every,
                     max_skip_fraction=args.max_skip_fraction,
                     task_tries=args.task_tries)


def main(argv: list[str] | None = None) -> Manifest:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    words = sys.argv[1:] if argv is None else argv
    task = next((word for word in words if word in TASKS), None)  # `TASK --help` lists that task's inputs alone
    args = parser(task).parse_args(argv)  # argparse's own mistakes exit 2 too
    try:
        return run(config_from_args(args))
    except UsageError as error:  # a user's mistake: one line, no traceback
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_USAGE) from None
    except JobRejected as error:  # the summary above says the rest
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_REJECTED) from None


def cli(argv: list[str] | None = None) -> None:
    """`janus-preprocess`: a console script exits with what its function returns, so return nothing."""
    main(argv)
