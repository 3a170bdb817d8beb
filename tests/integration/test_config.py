"""The training CLI and config: Table 2 defaults by the real model size, one-line errors for every known user
mistake (before anything heavy), YAML type checks, --help that documents itself.

Tests that start processes or take long here; the in-process ones are in tests/unit/test_config.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO, mistakes

LAUNCHER = str(Path(REPO) / "launchers" / "stage{}.py")


@pytest.mark.integration
def test_a_mistake_from_the_command_line_has_no_traceback(shard_corpus, tokenizer_dir, made, tmp_path):
    flags, expected = mistakes(shard_corpus, tokenizer_dir, made, tmp_path)["mistyped data"]
    done = subprocess.run([sys.executable, LAUNCHER.format(2), *flags], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr


@pytest.mark.integration
def test_help_documents_every_field_with_its_default_and_choices():
    import dataclasses

    from pipeline.config import SECTIONS

    done = subprocess.run([sys.executable, LAUNCHER.format(2), "--help"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DS_ACCELERATOR": "cpu", "COLUMNS": "400"})
    assert done.returncode == 0, done.stderr
    entries: dict[str, str] = {}  # option -> its help entry, continuation lines joined
    for line in done.stdout.splitlines():
        if line.startswith("  -"):
            option = line.split()[0]
            entries[option] = line
        elif line.startswith("    ") and entries:
            entries[option] += " " + line.strip()
    for kind in SECTIONS.values():
        for f in dataclasses.fields(kind):
            entry = " ".join(entries["--" + f.name.replace("_", "-")].split())
            assert " ".join(f.metadata["help"].split()) in entry and "(default: " in entry, entry
    assert "{constant,linear,cosine}" in done.stdout and "(default: 270000)" in done.stdout  # Table 2, Stage II


@pytest.mark.integration
def test_without_a_launcher_a_script_runs_as_one_rank(shard_corpus, tokenizer_dir, tmp_path):
    """`python launchers/stage1.py ...` with no launcher environment: one rank, not DeepSpeed's MPI discovery."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, LAUNCHER.format(1), "--model", "tiny", "--tokenizer", str(tokenizer_dir),
                           "--data", str(shard_corpus["understanding"]), str(shard_corpus["generation"]),
                           "--train-steps", "1", "--rows-per-step", "1", "--seq-len", "1400", "--sample-every", "0",
                           "--num-workers", "1", "--output", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Stage 1, 1 ranks" in done.stdout and (tmp_path / "run" / "checkpoints" / "step-00000001").is_dir()
