"""The training data path: shards -> task mixing -> guidance dropout -> packing -> PackedBatch.

Planning (which samples go in which row, reading the shards) runs in a thread of its own and records the state
after each micro-batch, so the state is exact; decoding images and building tensors runs in a thread pool ahead of
the step (PIL releases the GIL while decoding). The state saved with a checkpoint is the one after the last batch the
trainer *consumed*, not the last one prefetched, so a resumed run continues with exactly the next batch. It holds
the coverage counts (coverage.py) too: how many times each sample entered a micro-batch handed out, so a resumed run
continues counting.

A run resumed on another number of ranks continues from every old rank's state (`continue_from`): within each
epoch of each source, no row is trained twice and none is skipped. Which samples share a step then differs from
an uninterrupted run (each rank mixes and packs its own stream), but not which samples an epoch holds.
"""

from __future__ import annotations

import copy
import hashlib
import queue
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from model.batch import PackedBatch, pack_rows, sample_length
from model.sample import GENERATION, TASKS, Sample
from model.tokenizer import SpecialTokens
from pipeline.config import DataConfig
from pipeline.data.coverage import Coverage, coverage_summary
from pipeline.data.mixer import Mixer
from pipeline.data.packer import BufferedSample, Packer
from pipeline.data.reader import Source, SourceSpec


class TooLong(ValueError):
    """A task's samples do not fit --seq-len."""


def drops_prompt(seed: int, source: int, epoch: int, row_id: int, p: float) -> bool:
    """A stateless coin for guidance dropout: the same row in the same epoch always decides the same."""
    digest = hashlib.sha256(struct.pack("<4q", seed, source, epoch, row_id)).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < p


def with_prompt_dropped(sample: Sample, pad: int) -> Sample:
    """Every token strictly between BOS and <begin_of_image> becomes pad: the unconditional row of CFG."""
    start, end = sample.prompt_span
    ids = list(sample.input_ids)
    ids[start:end] = [pad] * (end - start)
    return replace(sample, input_ids=ids)


class DataPipeline:
    """The data section of the run's config (pipeline/config.py) as packed micro-batches for one rank.

    Fingerprints, when given, are checked against every shard's manifest (tokenizer and VQ the shards were made with).
    `verified`: every shard's sha256 was checked at start (reader.shard_problems), so opening one does not hash it.
    """

    def __init__(self, config: DataConfig, special: SpecialTokens | None, rank: int = 0, world_size: int = 1, *,
                 tokenizer_fingerprint: str | None = None, vq_fingerprint: str | None = None, verified: bool = False):
        if special is None and config.guidance_dropout > 0:
            raise ValueError("guidance dropout needs the tokenizer's special tokens (the pad id)")
        self.config, self.special = config, special
        self.rank, self.world_size = rank, world_size
        weights = config.data_weights or [1.0] * len(config.data)
        self.sources = [
            Source(SourceSpec(manifest, weight), rank, world_size, config.seed, tokenizer_fingerprint,
                   vq_fingerprint, config.allow_fingerprint_mismatch, verified)
            for manifest, weight in zip(config.data, weights, strict=True)
        ]
        self.mixer = Mixer(config.ratio, [s.task for s in self.sources], [s.weight for s in self.sources],
                           config.ratio_unit)
        # Padded rows, or one flat stream per micro-batch with the same token budget: the varlen kernels (and sdpa's
        # block-diagonal mask) need no padding, so none is computed.
        self.rows = config.rows_per_micro_batch if config.pad_rows else 1
        row_tokens = config.seq_len if config.pad_rows else config.seq_len * config.rows_per_micro_batch
        self.packer = Packer(row_tokens, config.buffer_size, config.max_age)
        self.too_long = dict.fromkeys(TASKS, 0)  # samples longer than seq_len, dropped: counted and logged
        self._too_long_in_a_row = dict.fromkeys(TASKS, 0)
        self._lengths_dropped: dict[str, list[int]] = {task: [] for task in TASKS}
        # Only the thread that hands micro-batches out touches it (never the planner thread): no lock, and no copy
        # of every source's counts with each planned micro-batch's state.
        self.coverage = Coverage([s.task for s in self.sources], [s.size for s in self.sources])
        self._consumed_state = self._plan_state()

    # ---- planning (main thread) ----
    def _entry(self, source: int, epoch: int, row_id: int, age: int = 0) -> BufferedSample:
        sample = self.sources[source].sample(row_id)
        if sample.task == GENERATION and drops_prompt(self.config.seed, source, epoch, row_id,
                                                      self.config.guidance_dropout):
            sample = with_prompt_dropped(sample, self.special.pad)
        return BufferedSample(source, epoch, row_id, sample, sample_length(sample, self.config.eoi_is_target), age)

    def _fill_buffer(self) -> None:
        while self.packer.needs() > 0:
            source = self.mixer.next_source()
            epoch, row_id = self.sources[source].next_ref()
            entry = self._entry(source, epoch, row_id)
            self.mixer.record(source, entry.length)
            task = entry.sample.task
            if entry.length > self.config.seq_len:
                self._drop_too_long(task, entry.length)
                continue
            self._too_long_in_a_row[task] = 0
            self.packer.add(entry)

    def _drop_too_long(self, task: str, length: int) -> None:
        """Count a sample that cannot fit a row; a task none of whose recent samples fit stops the run, rather
        than vanishing from the mix or spinning the loader forever."""
        self.too_long[task] += 1
        self._too_long_in_a_row[task] += 1
        seen = self._lengths_dropped[task]
        seen.append(length)
        del seen[:-self.config.max_too_long_in_a_row]
        if self._too_long_in_a_row[task] >= self.config.max_too_long_in_a_row:
            raise TooLong(f"{task}: the last {self._too_long_in_a_row[task]} samples drawn were all longer than "
                          f"--seq-len {self.config.seq_len} (lengths {min(seen)}-{max(seen)} tokens); raise "
                          f"--seq-len, or give that task's part of --ratio 0")

    def plan_rows(self) -> list[list[BufferedSample]]:
        """The next micro-batch's rows as packer entries: each sample with where it came from (source, epoch, row).
        Without --pad-rows, one row: the micro-batch's flat stream. Handed out like a batch of the iterator: its
        samples are counted in `coverage`, and `state_dict()` is the state after it."""
        rows = self._next_rows()
        self._hand_out(included(rows), self._plan_state())
        return rows

    def _next_rows(self) -> list[list[BufferedSample]]:
        rows = []
        for _ in range(self.rows):
            self._fill_buffer()
            rows.append(self.packer.next_row())
        return rows

    def plan_micro_batch(self) -> list[list[Sample]]:
        """The samples of the next micro-batch's rows, without decoding anything (benchmarks use it too)."""
        return [[e.sample for e in row] for row in self.plan_rows()]

    def _hand_out(self, refs: list[tuple[int, int]], state: dict) -> None:
        """A micro-batch leaves the pipeline (to the trainer, or to a plan_rows caller): its samples are counted and
        the state to save is the one after it."""
        self.coverage.add(refs)
        self._consumed_state = state

    def coverage_summary(self, coverage: Coverage | None = None) -> dict:
        """coverage.coverage_summary of `coverage` (this rank's own by default; pass the counts summed over ranks for
        the run's), the samples at the extremes named by their shards' keys."""
        counts = self.coverage if coverage is None else coverage
        return coverage_summary(counts, lambda source, row: self.sources[source].key(row))

    def _plan_state(self) -> dict:
        return copy.deepcopy({
            "sources": [s.state_dict() for s in self.sources],
            "mixer": self.mixer.state_dict(),
            "buffer": [e.ref() for e in self.packer.buffer],
            "too_long": self.too_long,
        })

    # ---- consumption ----
    def __iter__(self) -> Iterator[PackedBatch]:
        """Batches in plan order. Planning (and the shard reads it makes) runs in a thread of its own, the batches'
        tensors in a pool of `num_workers`, `prefetch` micro-batches ahead: the training thread only waits."""
        self.load_state_dict(self.state_dict())  # drop what an earlier iterator prefetched but never handed out
        ready: queue.Queue = queue.Queue(maxsize=max(1, self.config.prefetch))
        stop = threading.Event()
        with ThreadPoolExecutor(max_workers=max(1, self.config.num_workers)) as pool:
            planner = threading.Thread(target=self._plan_ahead, args=(pool, ready, stop), daemon=True,
                                       name="data-planner")
            planner.start()
            try:
                while True:
                    planned = ready.get()
                    if isinstance(planned, BaseException):  # TooLong, a damaged shard: the trainer's to handle
                        raise planned
                    future, state, refs = planned
                    batch = future.result()
                    self._hand_out(refs, state)
                    yield batch
            finally:
                stop.set()
                planner.join()

    def _plan_ahead(self, pool: ThreadPoolExecutor, ready: queue.Queue, stop: threading.Event) -> None:
        """The planner thread: plan, submit the tensors' build, queue (future, state after it, its samples' (source,
        row)) until stopped."""
        while not stop.is_set():
            try:
                rows = self._next_rows()
                planned = (pool.submit(self._tensors, [[e.sample for e in row] for row in rows]), self._plan_state(),
                           included(rows))
            except BaseException as error:  # handed to the training thread, which raises it
                planned = error
            while not stop.is_set():
                try:
                    ready.put(planned, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(planned, BaseException):
                return

    def _tensors(self, rows: list[list[Sample]]) -> PackedBatch:
        """A worker thread's part: the rows' tensors, in pinned memory on a GPU machine (the copy to the device then
        does not block the training thread)."""
        pad_to = self.config.seq_len if self.config.pad_rows else None
        return pack_rows(rows, pad_to, self.special, self.config.eoi_is_target).pin_memory()

    def state_dict(self) -> dict:
        """The state after the last batch handed out, coverage counts included (JSON-serialisable)."""
        return {**copy.deepcopy(self._consumed_state), "coverage": self.coverage.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for source, s in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(s)
        self.mixer.load_state_dict(state["mixer"])
        self.packer.buffer = [self._entry(*ref) for ref in state["buffer"]]
        self.too_long = dict(state["too_long"])
        self.coverage.load_state_dict(state.get("coverage"))  # absent in checkpoints from before coverage
        self._consumed_state = self._plan_state()

    def continue_from(self, states: list[dict]) -> None:
        """Continue after the states every rank of a run with another world size saved, in rank order.

        The guarantee: within each epoch of each source, every row is trained exactly once across both runs.
        Each source drops from the epochs the old ranks were part-way through the rows any of them had drawn
        (Source.continue_from), and the new ranks share the rest; the rows the old ranks had drawn but not yet
        packed (their packer buffers) are dealt out to the new ranks, oldest first, and packed by them. The task
        mix continues from the old ranks' mean of what each task was fed; the too-long counts, summed in every
        log record, and the coverage counts, summed over ranks when reported, go to rank 0.
        """
        for i, source in enumerate(self.sources):
            source.continue_from([s["sources"][i] for s in states])
        self.mixer.load_state_dict(Mixer.mean_state([s["mixer"] for s in states]))
        waiting = sorted((ref for s in states for ref in s["buffer"]), key=lambda ref: -ref[3])  # ref[3]: its age
        self.packer.buffer = [self._entry(*ref) for ref in waiting[self.rank::self.world_size]]
        self.too_long = {t: sum(s["too_long"][t] for s in states) if self.rank == 0 else 0 for t in TASKS}
        self.coverage.load_sum([s.get("coverage") for s in states] if self.rank == 0 else [])
        self._consumed_state = self._plan_state()


def included(rows: list[list[BufferedSample]]) -> list[tuple[int, int]]:
    """(source, row id) of every sample of a micro-batch's rows: what coverage counts."""
    return [(e.source, e.row_id) for row in rows for e in row]
