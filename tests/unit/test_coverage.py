"""Coverage ("every sample learned", issue #30): every sample of a source is trained about as often as its source's
share of the mix says, the counts survive a resume, and the summary a log line and coverage.json print."""

import json
import math

import pytest
import torch

from pipeline.data import DataPipeline
from pipeline.data.coverage import Coverage, coverage_extremes, coverage_line, summed_over_ranks, write_coverage
from tests.support import make_config

Ref = tuple[int, int, int]  # (source, epoch, row id): a sample's identity in the data path

# (ratio und:text:gen, --seq-len, rows per micro-batch, packer buffer and max age, micro-batches planned). The first
# two are Stage I's mix at the memorisation run's row shape: 4 rows of 1300 tokens, generation samples ~590 tokens;
# the second with the config's default buffer (64 samples: more than an epoch of these 30-sample sources, so a
# sample can wait in the buffer beside its own copy from the next epoch).
CASES = [((1, 0, 3), 1300, 4, (16, 8), 400), ((1, 0, 3), 1300, 4, (64, 16), 400), ((1, 1, 1), 1300, 4, (16, 8), 400),
         ((1, 1, 1), 2048, 2, (16, 8), 400), ((3, 1, 0), 4096, 1, (16, 8), 400)]

def planned(pipe: DataPipeline, micro_batches: int) -> list[Ref]:
    return [(e.source, e.epoch, e.row_id) for _ in range(micro_batches) for row in pipe.plan_rows() for e in row]


def lag_epochs(pipe: DataPipeline, source: int, micro_batches: int) -> int:
    """How many epochs of `source` may pass while one of its samples waits in the packer's buffer. A sample is
    packed at the latest once it is max_age rows old (plus the row that takes it), so it trails its epoch by at
    most the epochs its source goes through in those rows: more than one when a source is small (a few photos)."""
    per_micro_batch = int(pipe.coverage.counts[source].sum()) / micro_batches
    wait_micro_batches = (pipe.config.max_age + 1) / pipe.rows
    return math.ceil(wait_micro_batches * per_micro_batch / pipe.sources[source].size)


@pytest.mark.parametrize(("ratio", "seq_len", "rows", "buffer", "micro_batches"), CASES)
def test_every_sample_is_seen_as_often_as_its_share_says(shard_corpus, special, ratio, seq_len, rows, buffer,
                                                         micro_batches):
    pipe = DataPipeline(make_config(shard_corpus, ratio, seq_len=seq_len, rows_per_micro_batch=rows,
                                    buffer_size=buffer[0], max_age=buffer[1], guidance_dropout=0.0), special)
    refs = planned(pipe, micro_batches)
    measured = {}
    for source, counts in enumerate(pipe.coverage.counts):
        expected = counts.sum().item() / len(counts)  # the source's inclusions shared evenly by its samples
        # Each epoch holds a sample once; it trails by up to lag epochs while it waits in the buffer, and leads by
        # at most the part-read epoch.
        tolerance = 1 + lag_epochs(pipe, source, micro_batches)
        low, high = counts.min().item(), counts.max().item()
        measured[pipe.sources[source].task] = (low, high, round(expected, 2))
        assert expected - tolerance <= low and high <= expected + tolerance, (ratio, seq_len, source, measured)
        assert high - low <= tolerance, (ratio, seq_len, source, measured)  # bounded: no sample drifts behind
    assert len(refs) == len(set(refs)), "a sample entered two micro-batches in one epoch"
    for source, counts in enumerate(pipe.coverage.counts):
        waiting = {e.epoch for e in pipe.packer.buffer if e.source == source}
        done = [epoch for epoch in range(pipe.sources[source].epoch) if epoch not in waiting]
        assert done[:1] == [0], (ratio, source)
        for epoch in done:  # every sample once: none repeated, none skipped
            assert sorted(r for s, e, r in refs if (s, e) == (source, epoch)) == list(range(len(counts)))
        assert torch.equal(counts, torch.bincount(torch.tensor([r for s, _, r in refs if s == source]),
                                                  minlength=len(counts)).to(torch.int32))
    print(ratio, seq_len, rows, buffer, measured)  # -s shows what was measured: (min, max, expected) per task


def test_a_resumed_run_continues_counting(shard_corpus, special, tmp_path):
    config = make_config(shard_corpus, (1, 1, 1), seq_len=1300, rows_per_micro_batch=4, guidance_dropout=0.0)
    uninterrupted = DataPipeline(config, special)
    planned(uninterrupted, 50)
    first = DataPipeline(config, special)
    planned(first, 20)
    torch.save({"data": first.state_dict()}, tmp_path / "rank-0.pt")  # as a checkpoint stores it
    saved = torch.load(tmp_path / "rank-0.pt", weights_only=True)["data"]
    assert json.loads(json.dumps(saved)) == saved  # plain data, as the rest of the data state
    resumed = DataPipeline(config, special)
    resumed.load_state_dict(saved)
    assert [c.tolist() for c in resumed.coverage.counts] == [c.tolist() for c in first.coverage.counts]
    planned(resumed, 30)
    assert [c.tolist() for c in resumed.coverage.counts] == [c.tolist() for c in uninterrupted.coverage.counts]


def test_the_trainer_counts_what_it_consumed_not_what_was_prefetched(shard_corpus, special):
    config = make_config(shard_corpus, (1, 1, 1), guidance_dropout=0.0, prefetch=3)
    replay = DataPipeline(config, special)
    planned(replay, 3)
    trainer = DataPipeline(config, special)
    batches = iter(trainer)
    for _ in range(3):
        next(batches)
    saved = trainer.state_dict()
    batches.close()
    assert saved["coverage"] == replay.state_dict()["coverage"]


def test_counts_before_a_resize_are_kept_once(shard_corpus, special):
    config = make_config(shard_corpus, (1, 1, 1), guidance_dropout=0.0)
    old = [DataPipeline(config, special, rank, 2) for rank in range(2)]
    for pipe in old:
        planned(pipe, 10)
    total = sum(pipe.coverage.flat() for pipe in old)
    new = [DataPipeline(config, special, rank, 3) for rank in range(3)]
    for pipe in new:
        pipe.continue_from([p.state_dict() for p in old])
    assert torch.equal(sum(pipe.coverage.flat() for pipe in new), total)  # summed over ranks: nothing lost or doubled


def test_a_checkpoint_from_before_coverage_starts_at_zero(shard_corpus, special):
    pipe = DataPipeline(make_config(shard_corpus, (1, 1, 1), guidance_dropout=0.0), special)
    planned(pipe, 5)
    state = pipe.state_dict()
    del state["coverage"]
    pipe.load_state_dict(state)
    assert all(int(c.sum()) == 0 for c in pipe.coverage.counts)
    other = DataPipeline(make_config(shard_corpus, (1, 1, 0), guidance_dropout=0.0), special)
    with pytest.raises(ValueError, match="--data changed"):
        other.coverage.load_state_dict(DataPipeline(make_config(shard_corpus, (1, 0, 1)), special).state_dict()
                                       ["coverage"])


def test_summary_names_the_extremes_and_fits_a_log_line(shard_corpus, special, tmp_path):
    pipe = DataPipeline(make_config(shard_corpus, (1, 0, 3), guidance_dropout=0.0), special)
    coverage = Coverage(pipe.coverage.tasks, [s.size for s in pipe.sources])
    coverage.counts[1] += 12  # generation is the second source here (und, gen)
    coverage.counts[1][[4, 9]] = 15
    coverage.counts[0][7] = 2
    summary = pipe.coverage_summary(summed_over_ranks(coverage, torch.device("cpu")))
    assert list(summary) == ["understanding", "generation"]
    generation = summary["generation"]
    keys = {pipe.sources[1].key(r) for r in (4, 9)}
    assert (generation["min"], generation["max"], generation["at_max"]) == (12, 15, 2)
    assert set(generation["most_seen"]) == keys and all(k.startswith("g") for k in generation["least_seen"])
    assert len(generation["least_seen"]) == 3 and generation["median"] == 12.0
    assert summary["understanding"]["most_seen"] == [pipe.sources[0].key(7)]
    assert coverage_line(summary) == coverage_line(coverage_extremes(coverage)) == "cover und 0-2 gen 12-15"
    write_coverage(tmp_path / "coverage.json", summary)
    assert json.loads((tmp_path / "coverage.json").read_text()) == summary
