"""bench/gpu_check.sh's rehearsal on the CPU (GPU_CHECK_DRY=1): every step that needs no CUDA, offline.

The carried wheel folder is a tiny wheel written here (a wheel is a zip: nothing is built or fetched), pinned in a
constraints file of its own; the script installs it with pip --no-index into a temporary target and asserts its
version. The test also holds the script to its budget: the caps it declares add up to at most 6 minutes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO

SCRIPT = Path(REPO) / "bench" / "gpu_check.sh"
PROBE, MODULE = "gpucheck-probe", "gpucheck_probe"
PARTS = ["env", "wheels", "shards", "kernels", "stage2", "train_step_ckpt_on", "train_step_ckpt_off", "vq",
         "host_syncs_unit", "host_syncs_train"]


def write_wheel(directory: Path, version: str) -> Path:
    """A minimal pure-Python wheel of PROBE (module, METADATA, WHEEL, RECORD with hashes), fixed timestamps."""
    dist = f"{MODULE}-{version}.dist-info"
    files = {f"{MODULE}/__init__.py": f'__version__ = "{version}"\n',
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(t.encode())}" for p, t in files.items()]
    files[f"{dist}/RECORD"] = "\n".join([*record, f"{dist}/RECORD,,"]) + "\n"
    path = directory / f"{MODULE}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), text)
    return path


def dry_run(tmp_path: Path, wheels: Path, pinned: str = "1.2.3", timeout: float = 240):
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"# the rehearsal's pins\n{PROBE}=={pinned}\n")
    out = tmp_path / "out"
    env = {**os.environ, "GPU_CHECK_DRY": "1", "PYTHON": sys.executable, "OUT": str(out),
           "GPU_CHECK_WHEELS": str(wheels), "GPU_CHECK_CONSTRAINTS": str(constraints), "GPU_CHECK_REQUIRE": PROBE,
           "GPU_CHECK_IMPORTS": MODULE, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return done, out


def test_caps_add_up_to_at_most_six_minutes():
    text = SCRIPT.read_text()
    caps = {m.group(1): int(m.group(2)) for m in re.finditer(r"^CAP_(\w+)=(\d+)$", text, re.M)}
    budget = int(re.search(r"^BUDGET=(\d+)$", text, re.M).group(1))
    assert set(caps) == set(PARTS), caps
    assert sum(caps.values()) <= budget <= 360, (sum(caps.values()), budget)
    # Every part runs under timeout -k, and nothing compiles.
    assert 'timeout -k 5 "$cap"' in text
    assert not [line for line in text.splitlines() if "compile" in line and not line.lstrip().startswith("#")]


def test_dry_rehearsal_runs_every_step_and_writes_its_files(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels, "1.2.3")
    done, out = dry_run(tmp_path, wheels)
    assert done.returncode == 0, done.stderr[-4000:] + (out / "log.txt").read_text()[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["env.json", "log.txt", "results.jsonl", "summary.txt"]

    env = json.loads((out / "env.json").read_text())
    assert env["dry"] is True and env["python"] == sys.version.split()[0]
    assert env["torch"] and env["cuda_available"] is False and "transformers" in env["versions"]

    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["part"] for r in lines] == PARTS
    assert all(r["rc"] == 0 and r["status"] == "ok" and r["dry"] for r in lines), lines
    by_part = {r["part"]: r for r in lines}
    assert by_part["wheels"]["result"]["installed"] == {PROBE: "1.2.3"}
    assert by_part["wheels"]["result"]["optional_absent"] == ["deepspeed"]
    assert by_part["train_step_ckpt_off"]["config"] == "tiny seq 1024 varlen checkpointing off"
    assert '"backends": "[\'varlen\']"' in by_part["train_step_ckpt_on"]["log_tail"]  # parsed, not run
    assert "test_backend_matches_fp32_sdpa_reference_in_bf16" in by_part["kernels"]["log_tail"]

    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0].startswith("mode=dry budget=360")
    for name in PARTS:
        assert any(re.fullmatch(rf"{name} rc=0 seconds=[\d.]+ cap=\d+ config=.*", s) for s in summary), name
    assert "deepspeed_carried=0" in summary and summary[-1] == "result=ok"
    assert "torch.compile" not in (out / "log.txt").read_text()


@pytest.mark.parametrize("case", ["missing", "wrong_version"])
def test_dry_rehearsal_fails_loudly_on_a_missing_or_wrong_wheel(tmp_path, case):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    if case == "wrong_version":
        write_wheel(wheels, "1.2.4")
    done, out = dry_run(tmp_path, wheels, timeout=120)
    assert done.returncode == 3, done.stderr
    expected = ("carried wheel missing: gpucheck-probe==1.2.3" if case == "missing" else
                "carried wheel of the wrong version: gpucheck-probe 1.2.4")
    assert f"gpu_check: FAILED: {expected}" in done.stderr, done.stderr
    assert "no part was run" in done.stderr
    summary = (out / "summary.txt").read_text()
    assert "wheels rc=1 " in summary and summary.splitlines()[-1] == "result=FAILED at wheels"
    assert [json.loads(line)["part"] for line in (out / "results.jsonl").read_text().splitlines()] == ["env", "wheels"]
