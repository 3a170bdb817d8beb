"""The plan's levers through the launchers' own engine set-up (--ds-config and flags), on 2 CPU ranks (gloo): each
does the same step as plain ZeRO-3, to 1e-5 in loss and weights; a ZeRO-2 run and a --frozen-weights persisted run
also save, resume and export; gradients reduced in fp32 under a bf16 model send fp32's bytes, as the plan counts
them.

In-process tests here; the ones that start processes or take long are in tests/integration/test_levers.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

ALLOC = "PYTORCH_CUDA_ALLOC_CONF"
# Each stage script run as a module, not __main__ (its set-up without training), from the same starting environment.
ENTRIES_ENV = """import os, runpy, sys
start = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
for path in sys.argv[1:]:
    os.environ.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    os.environ.update({"PYTORCH_CUDA_ALLOC_CONF": start} if start else {})
    runpy.run_path(path)
    print(os.environ.get("PYTORCH_CUDA_ALLOC_CONF"))
"""


@pytest.mark.parametrize("user", [None, "max_split_size_mb:512"])
def test_the_launchers_set_expandable_segments_unless_the_user_did(user):
    """Both ways in: the stage scripts (under the deepspeed launcher) and the Slurm scripts' shared environment."""
    env = {k: v for k, v in os.environ.items() if k != ALLOC} | ({ALLOC: user} if user else {})
    want = user or "expandable_segments:True"
    scripts = [str(Path(REPO) / "launchers" / f"stage{stage}.py") for stage in (1, 2, 3)]
    out = subprocess.run([sys.executable, "-c", ENTRIES_ENV, *scripts], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    assert out.splitlines()[-3:] == [want] * 3
    sourced = subprocess.run(["bash", "-c", f'source "{REPO}/launchers/slurm/common.sh"; echo "${ALLOC}"'], env=env,
                             capture_output=True, text=True, timeout=60, check=True).stdout
    assert sourced.strip() == want
