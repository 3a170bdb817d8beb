"""In-process tests here; the ones that start processes or take long are in tests/integration/test_data_path.py."""

import threading
from pathlib import Path

import pytest
import torch

from model.batch import pack_rows, sample_length
from model.manifest import Manifest, ShardEntry
from model.sample import GENERATION, TASK_INDEX
from pipeline.data.loader import DataPipeline, TooLong, drops_prompt, with_prompt_dropped
from pipeline.data.packer import best_subset
from pipeline.data.reader import FingerprintMismatch, Source, SourceSpec, shared_prompt_notes
from tests.support import make_config


def test_best_subset_is_exact():
    lengths = [700, 600, 500, 400, 300]
    chosen = best_subset(lengths, 1000)
    assert sum(lengths[i] for i in chosen) == 1000
    assert best_subset([5000], 4096) == []
    assert sum(lengths[i] for i in best_subset(lengths, 999)) == 900


def test_ranks_cover_every_row_once_per_epoch(shard_corpus):
    spec = SourceSpec(str(shard_corpus["text"]))
    total = sum(s.rows for s in Manifest.read(shard_corpus["text"]).shards)
    for world in (1, 3, 7):  # 7 ranks > 3 shards: nobody starves
        seen = []
        for rank in range(world):
            source = Source(spec, rank, world, seed=5)
            n = len(source._epoch_order(0))
            refs = [source.next_ref() for _ in range(n)]
            assert {e for e, _ in refs} == {0} and n >= total // world
            seen += [r for _, r in refs]
        assert sorted(seen) == list(range(total))
    a, b = Source(spec, 0, 1, seed=5), Source(spec, 0, 1, seed=5)
    first = [a.next_ref()[1] for _ in range(total)]
    assert first == [b.next_ref()[1] for _ in range(total)]
    assert a.next_ref()[0] == 1 and [a.next_ref()[1] for _ in range(total - 1)] != first[1:]  # new epoch order


def test_fingerprint_and_checksum_are_enforced(shard_corpus, tmp_path):
    spec = SourceSpec(str(shard_corpus["text"]))
    with pytest.raises(FingerprintMismatch, match="tokenizer fingerprint"):
        Source(spec, 0, 1, seed=0, tokenizer_fingerprint="0" * 64)
    Source(spec, 0, 1, seed=0, tokenizer_fingerprint="0" * 64, allow_fingerprint_mismatch=True)
    # A shard changed after its manifest was written is refused when first opened.
    import shutil

    copy = tmp_path / "text"
    shutil.copytree(shard_corpus["text"], copy)
    victim = copy / Manifest.read(copy).shards[0].file
    victim.write_bytes(victim.read_bytes()[:-8] + b"\0" * 8)
    source = Source(SourceSpec(str(copy)), 0, 1, seed=0)
    with pytest.raises(ValueError, match="sha256"):
        source.sample(0)


def test_guidance_dropout_pads_exactly_the_prompt(shard_corpus, special):
    source = Source(SourceSpec(str(shard_corpus["generation"])), 0, 1, seed=0)
    sample = source.sample(0)
    dropped = with_prompt_dropped(sample, special.pad)
    start, end = sample.prompt_span
    assert dropped.input_ids[0] == special.bos and dropped.input_ids[-1] == special.begin_of_image
    assert (start, end) == (1, len(sample.input_ids) - 1)
    assert dropped.input_ids[start:end] == [special.pad] * (end - start)
    rate = sum(drops_prompt(0, 0, 0, r, 0.1) for r in range(20000)) / 20000
    assert abs(rate - 0.1) < 0.01


def test_ratio_per_step_and_every_task_in_every_step(shard_corpus, special):
    for ratio, unit in (((2, 3, 5), "samples"), ((5, 1, 4), "tokens"), ((1, 0, 3), "samples")):
        pipe = DataPipeline(make_config(shard_corpus, ratio, seq_len=4096, rows_per_micro_batch=1,
                                        buffer_size=48, ratio_unit=unit, guidance_dropout=0.0), special)
        share = torch.tensor(ratio, dtype=torch.float64) / sum(ratio)
        measured = []
        for _ in range(200):  # a step = 4 rows of 4096 tokens on this rank
            step = [s for _ in range(4) for s in pipe.plan_micro_batch()[0]]
            amount = torch.zeros(3, dtype=torch.float64)
            for s in step:
                amount[TASK_INDEX[s.task]] += 1 if unit == "samples" else sample_length(s)
            assert all(amount[i] > 0 for i in range(3) if ratio[i] > 0), (ratio, amount)
            measured.append(amount / amount.sum())
        mean = torch.stack(measured).mean(0)
        assert (mean - share).abs().max() < 0.02, (ratio, unit, mean)


@pytest.mark.parametrize("pad_rows", [True, False])
def test_packed_micro_batches_are_full(shard_corpus, special, pad_rows):
    pipe = DataPipeline(make_config(shard_corpus, (2, 3, 5), seq_len=4096, buffer_size=64, pad_rows=pad_rows), special)
    planned = [pipe.plan_micro_batch() for _ in range(30)]
    assert {len(mb) for mb in planned} == {2 if pad_rows else 1}  # padded rows, or one flat stream
    assert all(sum(sample_length(s) for s in row) <= 4096 * (1 if pad_rows else 2) for mb in planned for row in mb)
    used = sum(sample_length(s) for mb in planned for row in mb for s in row)
    assert used / (2 * 4096 * len(planned)) > 0.99  # the token budget: 2 rows x 4096


@torch.no_grad()
@pytest.mark.parametrize("pad_rows", [True, False])
def test_micro_batches_equal_samples_one_by_one(shard_corpus, special, tiny_model, pad_rows):
    """The data path's own batches: each sample's per-token losses are what it gets alone. Flat (the default), a
    micro-batch is one row holding exactly its samples' tokens: no padding is computed."""
    pipe = DataPipeline(make_config(shard_corpus, guidance_dropout=0.5, pad_rows=pad_rows, num_workers=1), special)
    rows = pipe.plan_micro_batch()
    pipe.load_state_dict(DataPipeline(pipe.config, special).state_dict())  # replay: iter() gives the same rows
    batch = next(iter(pipe))
    if pad_rows:
        assert batch.input_ids.shape == (2, 2048) and (batch.task == -1).any()
    else:
        assert batch.input_ids.shape[0] == 1 and (batch.task >= 0).all()  # nothing but samples
        assert batch.input_ids.shape[1] == sum(sample_length(s) for s in rows[0])
    out = tiny_model(batch)
    k = 0
    for b, row in enumerate(rows):
        for sample in row:
            at = batch.sample_index[b] == k
            alone = tiny_model(pack_rows([[sample]], None, special))
            assert alone.token_loss.shape[1] == int(at.sum())
            torch.testing.assert_close(out.token_loss[b, at], alone.token_loss[0], atol=1e-5, rtol=0)
            k += 1
    assert k >= 4


def test_generation_samples_are_dropped_at_the_configured_rate(shard_corpus, special):
    pipe = DataPipeline(make_config(shard_corpus, (0, 0, 1), guidance_dropout=0.5, seq_len=4096), special)
    gens = [s for _ in range(40) for row in pipe.plan_micro_batch() for s in row if s.task == GENERATION]
    padded = [s for s in gens if s.input_ids[1] == special.pad]
    assert 0.3 < len(padded) / len(gens) < 0.7


def test_samples_longer_than_a_row_are_counted_per_task(shard_corpus, special):
    pipe = DataPipeline(make_config(shard_corpus, (0, 1, 0), seq_len=600, guidance_dropout=0.0), special)
    rows = [pipe.plan_micro_batch() for _ in range(20)]
    assert pipe.too_long["text"] > 0 and pipe.too_long["understanding"] == pipe.too_long["generation"] == 0
    assert all(len(s.input_ids) <= 600 for batch in rows for row in batch for s in row)
    assert all(sum(len(s.input_ids) for s in row) <= 2 * 600 for batch in rows for row in batch)  # 2 rows' budget
    assert pipe.state_dict()["too_long"]["text"] <= pipe.too_long["text"]  # saved with a checkpoint


def test_a_task_whose_samples_never_fit_stops_the_run_at_once(shard_corpus, special):
    """Generation samples are ~590 tokens: at --seq-len 500 none fits. Without a bound the loader would draw
    forever (or, mixed with a task that fits, that task would silently vanish from every step)."""
    from pipeline.data import TooLong

    pipe = DataPipeline(make_config(shard_corpus, (0, 1, 1), seq_len=500, guidance_dropout=0.0,
                                    max_too_long_in_a_row=16), special)
    with pytest.raises(TooLong, match=r"generation: the last 16 samples drawn were all longer than --seq-len 500 "
                                      r"\(lengths \d+-\d+ tokens\)"):
        for _ in range(100):
            pipe.plan_micro_batch()


def test_shards_are_hashed_once_across_ranks_and_damage_is_found_at_start(shard_corpus, special, tmp_path,
                                                                           monkeypatch):
    import shutil

    from model import manifest
    from pipeline.data import reader

    copy = tmp_path / "text"
    shutil.copytree(shard_corpus["text"], copy)
    manifests = [str(shard_corpus["generation"]), str(copy)]
    hashed: list[Path] = []
    real = manifest.file_sha256  # every shard check hashes through it
    monkeypatch.setattr(manifest, "file_sha256", lambda path: hashed.append(Path(path)) or real(path))
    assert reader.shard_problems(manifests, 0, 2) == reader.shard_problems(manifests, 1, 2) == []
    assert len(hashed) == len(set(hashed)) == 6  # 3 shards per manifest, each hashed by one of the 2 ranks

    hashed.clear()  # a pipeline whose shards were checked at start opens them without hashing again
    corpus = {"generation": shard_corpus["generation"], "text": copy}
    pipe = DataPipeline(make_config(corpus, (0, 1, 1), guidance_dropout=0.0), special, verified=True)
    for _ in range(5):
        pipe.plan_micro_batch()
    assert hashed == []

    shard = sorted(copy.glob("*.arrow"))[1]
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    problems = reader.shard_problems(manifests)
    assert problems == [f"{shard} does not match its sha256 (recorded in its manifest)"]


def test_planning_and_shard_reads_run_off_the_training_thread(shard_corpus, special):
    pipe = DataPipeline(make_config(shard_corpus, guidance_dropout=0.0), special)
    readers: set[str] = set()
    for source in pipe.sources:
        read = source.sample

        def recorded(row_id, read=read):
            readers.add(threading.current_thread().name)
            return read(row_id)

        source.sample = recorded
    batches = iter(pipe)
    for _ in range(3):
        next(batches)
    batches.close()
    assert readers == {"data-planner"}


def test_a_planning_error_reaches_the_training_thread(shard_corpus, special):
    pipe = DataPipeline(make_config(shard_corpus, (0, 1, 0), seq_len=100, max_too_long_in_a_row=4), special)
    with pytest.raises(TooLong, match="longer than --seq-len 100"):
        next(iter(pipe))


def test_planned_micro_batches_are_handed_out_and_iteration_continues_after_them(shard_corpus, special):
    """plan_rows hands a micro-batch out as the iterator does: the state (and coverage) is the one after it, so an
    iterator started afterwards continues with the next micro-batch, not the first one again."""
    config = make_config(shard_corpus, (1, 1, 1), guidance_dropout=0.0, num_workers=1)
    replay = DataPipeline(config, special)
    for _ in range(3):
        replay.plan_rows()
    pipe = DataPipeline(config, special)
    for _ in range(2):
        pipe.plan_rows()
    batches = iter(pipe)
    next(batches)
    batches.close()
    state, expected = pipe.state_dict(), replay.state_dict()
    assert [state[k] for k in ("sources", "mixer", "buffer", "coverage")] == \
        [expected[k] for k in ("sources", "mixer", "buffer", "coverage")]


def test_a_run_notes_generation_rows_that_share_a_prompt(tmp_path):
    """The manifest's count of rows sharing a prompt (preprocess counts it) is said at the start of a run, once per
    dataset that has any; a dataset without, or a manifest from before the count, gets no line."""
    counts = {"shared": (3, 2), "distinct": (4, 0), "older": (None, None)}
    for name, (distinct, shared) in counts.items():
        (tmp_path / name).mkdir()
        Manifest(task=GENERATION, tokenizer_fingerprint="t", shards=[ShardEntry("g.arrow", 4, "0")], rows_in=4,
                 rows_written=4, distinct_prompts=distinct, rows_sharing_a_prompt=shared).write(tmp_path / name)
    notes = shared_prompt_notes([str(tmp_path / name) for name in counts])
    assert len(notes) == 1 and "shared: 2 of 4 generation rows share their prompt" in notes[0], notes
