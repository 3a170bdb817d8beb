"""Issue 18: no host syncs on the hot path: the model's forward and backward on a packed mixed-task micro-batch,
and the training step around them (pipeline/train.py's loop on 2 DeepSpeed ranks) outside log steps.

On a GPU every op that needs a value (or a size) computed on the device blocks the host until the device
catches up, and the next kernels wait for the host. The CPU has no such wait, so this records the ops that
would make one: the aten ops below, seen by a TorchDispatchMode (forward and backward both dispatch there),
and `tolist`/`item`/`cpu`, seen by a TorchFunctionMode (they read the data without dispatching an op).

The training-step test's ranks run tests/ranks/record_host_syncs.py.

Tests that start processes or take long here; the in-process ones are in tests/unit/test_host_syncs.py.
"""

from __future__ import annotations

import json

import pytest
import torch

QUIET_STEPS = (2, 3, 4)  # of 5, logging every 100: step 1 (the first) and 5 (the last) log, 5 checkpoints


@pytest.mark.integration
def test_training_steps_make_no_host_syncs_of_ours_outside_log_steps(shard_corpus, tokenizer_dir, init_checkpoint,
                                                                      tmp_path):
    """train() itself, 2 ranks x 2 micro-batches per step: on the steps that neither log nor checkpoint, every
    host sync is DeepSpeed's own: its ZeRO-3 step reads whether the gradient norm is finite (and torch's AdamW
    reads its step count, a host tensor). Without the stop flag's one-step-late read, every step had one of ours."""
    from tests.support import rank_script, run_ranks

    flags = ["--model", "tiny", "--tokenizer", str(tokenizer_dir), "--init", str(init_checkpoint),
             "--data", *[str(shard_corpus[t]) for t in ("understanding", "text", "generation")],
             "--seq-len", "1400", "--rows-per-step", "4", "--rows-per-micro-batch", "1", "--train-steps", "5",
             "--log-every", "100", "--save-every", "1000", "--num-workers", "1", "--output", str(tmp_path / "run")]
    (tmp_path / "run").mkdir()
    gpus = torch.cuda.device_count()
    outputs = run_ranks(rank_script("record_host_syncs.py", {"flags": flags}), world_size=min(gpus, 2) or 2,
                        timeout=600,
                        env={"DS_ACCELERATOR": "cuda"} if gpus else None)
    syncs = [{**json.loads(line[len("SYNC "):]), "rank": rank} for rank, out in enumerate(outputs)
             for line in out.splitlines() if line.startswith("SYNC ")]
    quiet = [s for s in syncs if s["step"] in QUIET_STEPS]
    print("host syncs on the quiet steps:", *sorted({f"{s['op']} at {s['site']}" for s in quiet}), sep="\n  ")
    ours = [f"rank {s['rank']} step {s['step']}: {s['op']} at {s['site']}" for s in quiet if s["who"] == "ours"]
    assert not ours, "\n".join(ours)
    # The recorder was there all along: it saw DeepSpeed's step on every quiet step and ours on the first (a log step).
    assert {(s["rank"], s["step"]) for s in quiet} == {(r, n) for r in range(len(outputs)) for n in QUIET_STEPS}
    assert any(s["who"] == "ours" and s["step"] == 1 for s in syncs)
