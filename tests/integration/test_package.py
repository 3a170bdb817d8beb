"""The package as a user installs it: declared dependencies, extras that keep inference light, the transformers
floor, and a wheel built from the sources that trains a step from outside the checkout.

Tests that start processes or take long here; the in-process ones are in tests/unit/test_package.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support import PACKAGES, REPO, free_port


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


@pytest.mark.integration
def test_installed_wheel_trains_a_stage2_step_outside_the_checkout(tmp_path, tokenizer_dir, shard_corpus):
    # Build from a copy holding only what the wheel is made of: no stale build/ from the checkout gets in.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp_path / "dist", src], timeout=300)
    (wheel,) = (tmp_path / "dist").glob("janus_pipeline-*.whl")
    shutil.rmtree(src)  # from here on only the installed copy exists

    # A fresh venv holding only the wheel; the dependencies are this environment's, reached through a .pth line
    # (a path in a .pth file is put on sys.path, but its own .pth files, e.g. an editable install's, are not run).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    (site / "tested-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
         timeout=300)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    where = _run([python, "-c", "import pipeline.ds_config as d, launchers; print(d.__file__); print(d.DS_CONFIGS);"
                  "print(launchers.__file__)"], cwd=elsewhere, env=env).stdout.split()
    for path in where:
        assert Path(path).is_relative_to(site), f"imported from {path}, not from the installed {site}"
    assert (Path(where[1]) / "zero3_cpu.json").is_file()
    assert {"stage2.sbatch", "common.sh", "task.sh"} <= {p.name for p in (site / "launchers" / "slurm").iterdir()}

    out = tmp_path / "run"
    data = [shard_corpus[task] for task in ("understanding", "text", "generation")]
    result = _run([venv / "bin" / "janus-train", "--stage", "2", "--model", "tiny", "--tokenizer", tokenizer_dir,
                   "--data", *data, "--train-steps", "1", "--seq-len", "1024", "--rows-per-step", "1",
                   "--output", out, "--sample-every", "0"], cwd=elsewhere, env=env, timeout=900)
    complete = out / "checkpoints" / "step-00000001" / "COMPLETE"
    assert complete.is_file(), f"no complete checkpoint of step 1:\n{result.stdout[-4000:]}"
    assert (out / "ds_config.json").is_file()
