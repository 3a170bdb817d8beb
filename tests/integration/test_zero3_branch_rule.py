"""ZeRO-3 gathers a module's parameters collectively: every rank must run every module in every micro-batch."""

import pytest

from tests.support import Ranks, rank_script, run_ranks

pytestmark = pytest.mark.integration

# What gloo prints when the ranks' collectives disagree (here: all-gathers of different modules' shards).
GLOO_MISMATCH = "Received data size doesn't match expected size. Is there a distributed collective mismatch"


def branch_step(shard_corpus, tokenizer_dir, run_every_module: bool) -> list[str]:
    args = {"tokenizer": str(tokenizer_dir), "corpus": {k: str(v) for k, v in shard_corpus.items()},
            "run_every_module": run_every_module}
    return rank_script("zero3_branch_step.py", args)


def test_ranks_with_disjoint_tasks_finish_a_zero3_step(shard_corpus, tokenizer_dir):
    outputs = run_ranks(branch_step(shard_corpus, tokenizer_dir, run_every_module=True), timeout=240)
    assert "rank 0 finished a step, targets [0, 0, " in outputs[0]
    assert "rank 1 finished a step, targets [" in outputs[1]


def test_without_the_branch_rule_the_step_fails(shard_corpus, tokenizer_dir):
    """On NCCL the mismatched parameter gathers hang; gloo notices the collective mismatch and aborts.
    A timeout (subprocess.TimeoutExpired) or any other failure is not this and fails the test."""
    ranks = Ranks(branch_step(shard_corpus, tokenizer_dir, run_every_module=False))
    with pytest.raises(AssertionError, match=r"rank \d exited"):
        ranks.wait(timeout=120)
    outputs = [ranks.output(rank) for rank in range(2)]
    assert any(GLOO_MISMATCH in out for out in outputs), "\n=====\n".join(out[-3000:] for out in outputs)
    assert not any("finished a step" in out for out in outputs)
