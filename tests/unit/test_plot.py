"""`python -m pipeline.plot RUN... --out PNG`: loss curves from the runs' metrics.jsonl, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.plot import COLOURS
from pipeline.run_dir import metrics_file
from tests.support import REPO


def plot(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.plot", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def write_run(run: Path, steps: range, tasks: tuple[str, ...]) -> Path:
    run.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": {t: 5.0 / s + i for i, t in enumerate(tasks)}}) for s in steps]
    metrics_file(run).write_text("\n".join(lines) + "\n")
    return run


def pixels_of(image: np.ndarray, colour: tuple[int, int, int]) -> int:
    return int((image == np.array(colour)).all(-1).sum())


def test_two_stages_draw_one_png_with_a_curve_per_task(tmp_path):
    stage1 = write_run(tmp_path / "stage1", range(1, 40), ("understanding", "generation"))
    stage2 = write_run(tmp_path / "stage2", range(1, 40), ("understanding", "text", "generation"))
    out = tmp_path / "plots" / "loss.png"
    done = plot(str(stage1), str(stage2), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    with Image.open(out) as image:
        image.verify()  # a whole PNG, not a torn file
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (900, 500)
        drawn = np.asarray(image.convert("RGB"))
    # Each task's curve, not only its legend entry (a few dozen pixels of text)
    for task in ("understanding", "text", "generation"):
        assert pixels_of(drawn, COLOURS[task]) > 300, task


def test_a_directory_without_metrics_is_one_error_line_and_exit_2(tmp_path):
    good = write_run(tmp_path / "stage1", range(1, 5), ("understanding",))
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    out = tmp_path / "loss.png"
    done = plot(str(good), str(empty), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: {empty}: no {metrics_file(empty).name} (not a training run's "
                                        "--output, or it has not logged a step yet)"]
    assert not out.exists()


def test_help_names_the_runs_and_out():
    done = plot("--help")
    assert done.returncode == 0
    assert "RUN" in done.stdout and "--out" in done.stdout and "metrics.jsonl" in done.stdout
