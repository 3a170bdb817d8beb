"""Issue 29: held-out Q&A samples under ZeRO-3 on 2 CPU ranks (tests/ranks/zero3_qa_samples.py): every rank runs
the same forwards, the understanding modules gathered once, and rank 0 alone writes the answers to TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing import event_accumulator

from pipeline.run_dir import samples_tensorboard_dir
from tests.support import rank_script, run_ranks

pytestmark = pytest.mark.integration

TOKENS = 8  # answer tokens: each one forward on every rank
QUESTIONS = 4  # LoggingConfig's qa_samples default


def records(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_zero3_answers_agree_across_ranks_gathered_once_and_rank_0_writes(tokenizer_dir, shard_corpus, tmp_path):
    run = tmp_path / "run"
    val_data = [str(shard_corpus["text"]), str(shard_corpus["understanding"])]
    args = {"tokenizer": str(tokenizer_dir), "val_data": val_data, "output": str(run), "tokens": TOKENS}
    outputs = run_ranks(rank_script("zero3_qa_samples.py", args), timeout=300)
    ways = [{r["way"]: r for r in records(out) if "way" in r} for out in outputs]
    for rank, way in enumerate(ways):
        once, fallback = way["once"], way["fallback"]
        assert len(once["replies"]) == QUESTIONS and any(once["replies"]), rank
        assert fallback["replies"] == once["replies"], rank
        # One gather per parameter at most, however many tokens; per call, at least one per forward.
        assert 0 < once["gathers"] <= once["params"], (rank, once["gathers"], once["params"])
        assert fallback["gathers"] >= QUESTIONS * TOKENS, (rank, fallback["gathers"])
    assert ways[0]["once"]["replies"] == ways[1]["once"]["replies"]
    assert "Q&A" in outputs[0] and "Q&A" not in outputs[1]  # rank 0 logs

    folder = samples_tensorboard_dir(run)
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1  # rank 0's writer only
    events = event_accumulator.EventAccumulator(str(folder), size_guidance={event_accumulator.TENSORS: 0,
                                                                            event_accumulator.IMAGES: 0})
    events.Reload()
    for i, reply in enumerate(ways[0]["once"]["replies"]):
        said = [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"qa/{i}/text_summary")]
        assert [step for step, _ in said] == [1, 2]
        assert all(f"**model:** {reply}\n" in text for _, text in said)
        assert [e.step for e in events.Images(f"qa/{i}/image-0")] == [1]


def test_grid_and_answers_reach_rank_0s_wandb_run(tokenizer_dir, shard_corpus, tmp_path):
    """The W&B run the Monitor starts on rank 0 (here offline, its files read back); needs the [wandb] extra."""
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    args = {"tokenizer": str(tokenizer_dir), "val_data": [str(shard_corpus["understanding"])], "output": str(run),
            "tokens": 2, "wandb": True}
    outputs = run_ranks(rank_script("zero3_qa_samples.py", args), timeout=300)
    files = [r["wandb_files"] for r in records(outputs[0]) if "wandb_files" in r]
    assert len(files) == 1 and not [r for r in records(outputs[1]) if "wandb_files" in r]
    media = Path(files[0]) / "media"
    assert len(list(media.glob("images/samples/grid_*.png"))) == 1
    assert len(list(media.glob("images/qa/images_*.png"))) == QUESTIONS  # once, though asked twice
    tables = sorted(media.glob("table/qa/answers_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["key", "question", "model", "reference"] and len(table["data"]) == QUESTIONS
    replies = [r["replies"] for r in records(outputs[0]) if r.get("way") == "once"][0]
    assert [row[2] for row in table["data"]] == replies
