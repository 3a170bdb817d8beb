"""Resuming on another number of ranks (a node lost or added): DeepSpeed's universal checkpoint for the model and
optimizer, every old rank's data position for the data path, the batch plan derived for the new world size.

In-process tests here; the ones that start processes or take long are in tests/integration/test_resize.py.
"""


import pytest

from model.manifest import Manifest
from model.sample import TASKS
from pipeline.config import DataConfig
from pipeline.data import DataPipeline
from pipeline.data.reader import Source, SourceSpec

Ref = tuple[int, int, int]  # (source, epoch, row id): a sample's identity in the data path


def rows_of(corpus, task: str) -> int:
    return sum(s.rows for s in Manifest.read(corpus[task]).shards)


# ---- the data path (no DeepSpeed: every rank's pipeline in this process) ----

def test_a_source_resumed_on_other_world_sizes_reads_each_row_once_per_epoch(shard_corpus):
    """Old ranks stopped at uneven places, one already in the next epoch; twice resized (3 -> 2 -> 5 ranks)."""
    spec, total = SourceSpec(str(shard_corpus["text"])), rows_of(shard_corpus, "text")
    read: list[tuple[int, int]] = []

    def reader(rank: int, world: int, before: list[dict] | None) -> Source:
        source = Source(spec, rank, world, seed=5)
        if before is not None:
            source.continue_from(before)
        return source

    old = [reader(r, 3, None) for r in range(3)]
    for source, n in zip(old, (16, 9, 4), strict=True):  # shares of 14, 13, 13 rows: rank 0 is into epoch 1
        read += [source.next_ref() for _ in range(n)]
    assert [s.epoch for s in old] == [1, 0, 0]
    middle = [reader(r, 2, [s.state_dict() for s in old]) for r in range(2)]
    for source, n in zip(middle, (6, 1), strict=True):
        read += [source.next_ref() for _ in range(n)]
    new = [reader(r, 5, [s.state_dict() for s in middle]) for r in range(5)]
    for _ in range(3 * total):  # round robin until epochs 0 and 1 are through
        for source in new:
            read.append(source.next_ref())
    for epoch in (0, 1):
        rows = sorted(row for e, row in read if e == epoch)
        assert rows == list(range(total)), epoch  # every row once: none repeated, none skipped
    assert len(read) == len(set(read))


def data_config(corpus) -> DataConfig:
    return DataConfig(data=[str(corpus[t]) for t in TASKS], ratio=[1, 1, 1], seq_len=2048, rows_per_micro_batch=2,
                      buffer_size=16, max_age=8, seed=3, num_workers=1, prefetch=2, guidance_dropout=0.0)


def train_ranks(config: DataConfig, special, world: int, before: list[dict] | None,
                batches: int) -> tuple[list[Ref], list[dict]]:
    """Each of `world` ranks continues from `before` (every old rank's saved state; None: from the start) for
    `batches` micro-batches: the samples trained, and each rank's state as a checkpoint saves it."""
    def pipeline(rank: int) -> DataPipeline:
        pipe = DataPipeline(config, special, rank, world)
        if before is not None:
            pipe.continue_from(before)
        return pipe

    trained, saved = [], []
    for rank in range(world):
        planner = pipeline(rank)  # planning replays the stream the trainer consumes, with where each sample came from
        trained += [(e.source, e.epoch, e.row_id) for _ in range(batches) for row in planner.plan_rows() for e in row]
        trainer = pipeline(rank)
        consumed = iter(trainer)
        for _ in range(batches):
            next(consumed)
        saved.append(trainer.state_dict())
        consumed.close()
    return trained, saved


@pytest.mark.parametrize("worlds", [(2, 1), (1, 2), (2, 3, 1)])
def test_a_resized_data_path_trains_every_sample_once_per_epoch(shard_corpus, special, worlds):
    config = data_config(shard_corpus)
    sizes = [rows_of(shard_corpus, t) for t in TASKS]
    trained, states = [], None
    for i, world in enumerate(worlds):
        last = i == len(worlds) - 1
        refs, states = train_ranks(config, special, world, states, batches=40 // world if last else 8 // world)
        trained += refs
    assert len(trained) == len(set(trained)), "a sample trained twice in one epoch"
    waiting = {(ref[0], ref[1]) for s in states for ref in s["buffer"]}  # drawn, not trained yet
    for source, size in enumerate(sizes):
        reached = min(s["sources"][source]["epoch"] for s in states)  # every rank has read the epochs before it
        over = [epoch for epoch in range(reached) if (source, epoch) not in waiting]
        assert over[:1] == [0], (TASKS[source], reached)
        for epoch in over:  # every sample once: none repeated, none skipped
            rows = sorted(row for s, e, row in trained if (s, e) == (source, epoch))
            assert rows == list(range(size)), (TASKS[source], epoch)


# In this layout a run on 1 rank and one on 2 train the same global batch each step; what may differ is the order of
# fp32 sums (gradient accumulation against the all-reduce, norms over other partitions). Seen: bit-identical losses
# and weights; 1e-6 (as the same-size resume tests) leaves room for another summation order, not for a lost state.
LOSS_TOLERANCE, WEIGHT_TOLERANCE = 1e-6, 1e-6
