"""A run you can watch (issue 29): what rank 0 prints over a 2-rank CPU Stage II run, and a stop signal's
acknowledgement. The pieces, in-process: tests/unit/test_monitor.py."""

from __future__ import annotations

import json
import re
import signal
import time
from collections import Counter

import pytest

from pipeline.checkpoint import COMPLETE, latest_checkpoint
from tests.support import Ranks, stage_args

STEPS, SIGNAL_AT = 20, 15


def first_output(ranks: Ranks, rank: int, started: float, timeout: float) -> float:
    """Seconds from `started` until the rank's output holds a whole line."""
    while "\n" not in ranks.output(rank):
        assert time.monotonic() - started < timeout, "nothing printed"
        time.sleep(0.05)
    return time.monotonic() - started


def seconds_until(ranks: Ranks, rank: int, text: str, started: float, timeout: float) -> float:
    while text not in ranks.output(rank):
        assert time.monotonic() - started < timeout, f"{text!r} never appeared:\n{ranks.output(rank)[-3000:]}"
        time.sleep(0.02)
    return time.monotonic() - started


@pytest.mark.integration
def test_a_run_prints_a_few_lines_per_step_and_acknowledges_sigterm_at_once(shard_corpus, tokenizer_dir,
                                                                            init_checkpoint, tmp_path):
    """20 steps, a line per step (--log-every 1) and the data path's coverage line; SIGTERM to rank 1 after step 15.

    Measured on the shared 2-core CPU machine (2026-12-05): the first line (`start-up  importing torch, ...`, printed
    by the launcher before its imports) after 0.1 s, the imports' own line after ~20 s (the two ranks importing
    torch, DeepSpeed and transformers at once; 9 s for one process alone); 53-55 lines on rank 0 for 17 steps, 2 per
    step (its line and the coverage line); SIGTERM acknowledged after 0.02 s; the run stopped at step 17. Before
    issue 29 rank 0 also printed the whole config (~90 lines) and a FutureWarning (2 lines) per micro-batch: 1000
    steps of one micro-batch printed 2,000 warning lines.
    """
    output = tmp_path / "run"
    started = time.monotonic()
    ranks = Ranks(stage_args(2, shard_corpus, tokenizer_dir, output, init_checkpoint, "--train-steps", str(STEPS),
                             "--save-every", "1000"))
    first_line = first_output(ranks, 0, started, timeout=120)
    ranks.wait_for(0, f"step {SIGNAL_AT:7d} / {STEPS}", timeout=600)
    signalled = time.monotonic()
    ranks.signal(1, signal.SIGTERM)
    acknowledged = seconds_until(ranks, 1, "SIGTERM received", signalled, timeout=10)
    outputs = ranks.wait(timeout=300)  # every rank exits 0
    print(f"first line after {first_line:.1f}s; SIGTERM acknowledged after {acknowledged:.2f}s")
    lines = outputs[0].splitlines()
    print(f"{len(lines)} lines on rank 0:", *lines, sep="\n")

    # The first line comes before the imports (launchers/extras.py), the imports' own line after them.
    assert lines[0] == "start-up  importing torch, transformers and DeepSpeed", lines[0]
    assert lines[1].startswith("start-up  imports "), lines[1]
    assert acknowledged < 2, acknowledged
    assert "rank 1: SIGTERM received: every rank saves a checkpoint within 2 steps, then exits" in outputs[1]

    steps = [i for i, line in enumerate(lines) if line.startswith("step ")]
    phases = [i for i, line in enumerate(lines) if line.startswith("start-up  ")]
    assert {lines[i].split()[1] for i in phases} >= {"imports", "checks", "rendezvous", "shard", "engine", "resume",
                                                     "first"}
    assert max(phases) < steps[0]
    stopped = re.search(r"^stop signal: checkpointed step (\d+), exiting$", outputs[0], re.M)
    assert stopped, outputs[0][-3000:]
    last = int(stopped.group(1))
    assert SIGNAL_AT < last < STEPS and len(steps) == last
    latest = latest_checkpoint(output)
    assert json.loads((latest / COMPLETE).read_text())["step"] == last

    # Quiet: a step is its line and the coverage line; each warning at most once, and only on rank 0.
    assert all(b - a <= 2 for a, b in zip(steps, steps[1:], strict=False)), lines
    assert len(lines) <= 60, len(lines)
    warned = [line for line in lines if re.search(r"Warning\b|\[WARNING\]", line)]
    assert all(n == 1 for n in Counter(warned).values()), warned
    assert not [line for line in outputs[1].splitlines() if re.search(r"Warning\b|\[WARNING\]", line)], outputs[1]
    assert "reduce_scatter_tensor" not in outputs[0] + outputs[1]

    # A task without a sample in a step: a dash in the line, null in metrics.jsonl (never a made-up 0).
    records = {r["step"]: r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == list(range(1, last + 1))
    for i in steps:
        step = int(lines[i].split()[1])
        for task, short in (("understanding", "und"), ("text", "text"), ("generation", "gen")):
            loss = records[step]["loss"][task]
            assert loss is None or loss > 0
            assert (f" {short} - " in lines[i]) == (loss is None), (lines[i], records[step]["loss"])
