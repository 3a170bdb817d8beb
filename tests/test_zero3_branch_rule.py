import json
import subprocess
from pathlib import Path

import pytest

from tests.distributed import run_ranks

SCRIPT = str(Path(__file__).with_name("zero3_branch_step.py"))


def branch_step(shard_corpus, tokenizer_dir, run_every_module: bool, timeout: float) -> list[str]:
    args = {"tokenizer": str(tokenizer_dir), "corpus": {k: str(v) for k, v in shard_corpus.items()},
            "run_every_module": run_every_module}
    return run_ranks([SCRIPT, json.dumps(args)], world_size=2, timeout=timeout)


def test_ranks_with_disjoint_tasks_finish_a_zero3_step(shard_corpus, tokenizer_dir):
    outputs = branch_step(shard_corpus, tokenizer_dir, run_every_module=True, timeout=240)
    assert "rank 0 finished a step, targets [0, 0, " in outputs[0]
    assert "rank 1 finished a step, targets [" in outputs[1]


def test_without_the_branch_rule_the_step_fails(shard_corpus, tokenizer_dir):
    """On NCCL the mismatched parameter gathers hang; gloo notices the collective mismatch and aborts."""
    with pytest.raises((AssertionError, subprocess.TimeoutExpired)):
        branch_step(shard_corpus, tokenizer_dir, run_every_module=False, timeout=120)
