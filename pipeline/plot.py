"""A loss-curve PNG from the runs' metrics.jsonl, drawn with Pillow (no plotting dependency).

Stages are laid end to end on one step axis (each stage's steps after the previous stage's last), one line per
task, a dashed divider where a stage begins.

    python -m pipeline.plot RUN... [--out loss.png]     (RUN: a training run's --output, Stage I first)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import NoReturn

from PIL import Image, ImageDraw

from model.sample import TASKS
from pipeline.run_dir import metrics_file

COLOURS = {"understanding": (31, 119, 180), "text": (44, 160, 44), "generation": (214, 39, 40)}


def read_metrics(paths: list[Path]) -> tuple[dict[str, list[tuple[int, float]]], list[int]]:
    """Per task, (global step, loss) points over all stages; and the global step where each stage starts."""
    curves: dict[str, list[tuple[int, float]]] = {t: [] for t in TASKS}
    starts, offset = [], 0
    for path in paths:
        records: dict[int, dict] = {}
        for line in Path(path).read_text().splitlines():
            record = json.loads(line)
            records[record["step"]] = record  # after a resume the last record of a step wins
        starts.append(offset)
        for step in sorted(records):
            for task, value in records[step]["loss"].items():
                # null (0 in older runs' records): the task had no targets in that step (e.g. text in Stage I)
                if value is not None and value > 0:
                    curves[task].append((offset + step, value))
        offset += max(records, default=0)
    return curves, starts


def loss_curve_png(paths: list[Path], out: str | Path, size: tuple[int, int] = (900, 500)) -> Path:
    curves, starts = read_metrics(paths)
    points = [p for c in curves.values() for p in c]
    if not points:
        raise ValueError(f"no loss records in {[str(p) for p in paths]}")
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    x_max = max(s for s, _ in points)
    y_max = max(v for _, v in points) * 1.05

    def xy(step: float, value: float) -> tuple[float, float]:
        return (left + (width - left - right) * step / max(x_max, 1),
                height - bottom - (height - top - bottom) * value / y_max)

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for k in range(6):
        value = y_max * k / 5
        y = xy(0, value)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 6), f"{value:.2f}", fill="black")
    for k in range(6):
        step = x_max * k / 5
        x = xy(step, 0)[0]
        draw.text((x - 10, height - bottom + 6), f"{step:.0f}", fill="black")
    draw.text((width // 2 - 20, height - 22), "step", fill="black")
    for i, start in enumerate(starts):
        x = xy(start, 0)[0]
        for y in range(top, height - bottom, 8):
            draw.line([x, y, x, y + 4], fill=(150, 150, 150))
        draw.text((x + 4, top + 4), f"Stage {i + 1}", fill=(90, 90, 90))
    for i, (task, curve) in enumerate(curves.items()):
        colour = COLOURS.get(task, (0, 0, 0))
        if len(curve) > 1:
            draw.line([xy(s, v) for s, v in curve], fill=colour, width=2)
        draw.text((width - right - 120, top + 20 + 14 * i), f"-- {task}", fill=colour)
    draw.text((left, 8), "training loss per task", fill="black")
    out = Path(out)
    image.save(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.plot",
        description="Training loss per task from runs' metrics.jsonl, as one PNG. Several runs (Stage I, II, III) "
                    "are laid end to end on one step axis, in the order given.")
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a training run's directory (its --output)")
    parser.add_argument("--out", default="loss.png", help="the PNG to write (default: %(default)s)")
    args = parser.parse_args(argv)
    paths = [metrics_file(run) for run in args.runs]
    for run, path in zip(args.runs, paths, strict=True):
        if not path.is_file():
            fail(f"{run}: no {path.name} (not a training run's --output, or it has not logged a step yet)")
    out = Path(args.out)
    if out.is_dir():
        fail(f"--out {out}: a directory; name the PNG file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        loss_curve_png(paths, out)
    except ValueError as error:  # no loss record, a line that is not JSON, or --out not an image file name
        fail(str(error))
    print(f"wrote {out}")


def fail(message: str) -> NoReturn:
    """A mistake in the arguments or the files they name: one `error:` line, exit 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
