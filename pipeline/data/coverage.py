"""Coverage ("every sample learned"): how many times each sample entered a micro-batch, per source.

A count is kept for every row of every source (global row ids, 4 bytes each), not only for the rows this rank read:
which rows a rank reads changes with every epoch's shuffle, and with whole-source vectors the run's counts are one
sum over ranks (`summed_over_ranks`, one all-reduce) with nothing to merge. The price: a source of 100M samples holds
400 MB on every rank, and that all-reduce moves it. A saved state holds only the rows the rank counted. A sample's
key (the shards' `key` column) is read only for the few samples a summary names.

A sample counts when its micro-batch leaves the data pipeline (to the trainer, or to a caller of `plan_rows`), not
when it is drawn: a drawn sample waits in the packer's buffer, and one longer than --seq-len is never packed, so it
stays at 0 and shows as the minimum.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from model.sample import GENERATION, TASKS, TEXT, UNDERSTANDING

EXTREMES = 3  # keys named at each end of a task's counts: enough to look a sample up, short enough for a log
SHORT = {UNDERSTANDING: "und", TEXT: "text", GENERATION: "gen"}  # the log line's task names


class Coverage:
    """Per source (in the data config's order), one int32 count per row: times the row entered a micro-batch."""

    def __init__(self, tasks: list[str], sizes: list[int]):
        self.tasks = list(tasks)
        self.counts = [torch.zeros(n, dtype=torch.int32) for n in sizes]

    def add(self, included: Iterable[tuple[int, int]]) -> None:
        """Count each (source, row id) once more."""
        for source, row in included:
            self.counts[source][row] += 1

    def state_dict(self) -> dict:
        """JSON-serialisable, as the rest of the data state: per source, the rows counted so far and their counts
        (a rank's rows only, not a vector of the whole source)."""
        rows = [torch.nonzero(c).flatten() for c in self.counts]
        return {"sizes": [len(c) for c in self.counts], "rows": [r.tolist() for r in rows],
                "counts": [c[r].tolist() for c, r in zip(self.counts, rows, strict=True)]}

    def load_state_dict(self, state: dict | None) -> None:
        """None (a checkpoint from before coverage was counted): every count starts at 0."""
        self.load_sum([state])

    def load_sum(self, states: list[dict | None]) -> None:
        """The sum of several saved states (every old rank's, on a resized resume); None entries count 0."""
        sizes = [len(c) for c in self.counts]
        total = [torch.zeros(n, dtype=torch.int32) for n in sizes]
        for state in (s for s in states if s is not None):
            if state["sizes"] != sizes:
                raise ValueError(f"saved coverage counts rows per source {state['sizes']}, these sources have "
                                 f"{sizes}: the run's --data changed")
            for counts, rows, saved in zip(total, state["rows"], state["counts"], strict=True):
                counts[torch.tensor(rows, dtype=torch.int64)] += torch.tensor(saved, dtype=torch.int32)
        self.counts = total

    def flat(self) -> torch.Tensor:
        """Every source's counts in one vector: what an all-reduce sums."""
        return torch.cat(self.counts)

    def with_flat(self, flat: torch.Tensor) -> Coverage:
        """A Coverage of the same sources holding `flat` (the layout `flat()` gives), e.g. summed over ranks."""
        other = Coverage(self.tasks, [])
        other.counts = list(flat.to("cpu", torch.int32).split([len(c) for c in self.counts]))
        return other


def summed_over_ranks(coverage: Coverage, device: torch.device) -> Coverage:
    """Collective: every rank's counts summed (one all-reduce on `device`: NCCL needs the GPU). Each rank holds
    the counts of the rows it trained and 0 elsewhere, so the sum is the run's count per sample."""
    flat = coverage.flat().to(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flat)
    return coverage.with_flat(flat)


def coverage_extremes(coverage: Coverage) -> dict:
    """Per task that has data: {"min", "max"} count, all a log line prints (no median: a sort of every row)."""
    summary = {}
    for task in TASKS:
        counts = [coverage.counts[i] for i, t in enumerate(coverage.tasks) if t == task]
        if counts:
            summary[task] = {"min": min(int(c.min()) for c in counts), "max": max(int(c.max()) for c in counts)}
    return summary


def coverage_summary(coverage: Coverage, key_of: Callable[[int, int], str], extremes: int = EXTREMES) -> dict:
    """coverage_extremes, and per task: samples, median count, how many samples sit at min and at max, and the keys
    of the first `extremes` of each (by source, then row). A task of several sources is one population."""
    summary = coverage_extremes(coverage)
    for task, entry in summary.items():
        sources = [i for i, t in enumerate(coverage.tasks) if t == task]
        counts = np.concatenate([coverage.counts[i].numpy() for i in sources])
        least, most = entry["min"], entry["max"]
        entry.update({
            "samples": len(counts), "median": float(np.median(counts)),
            "at_min": int((counts == least).sum()), "at_max": int((counts == most).sum()),
            "least_seen": _keys_at(coverage, sources, least, key_of, extremes),
            "most_seen": _keys_at(coverage, sources, most, key_of, extremes),
        })
    return summary


def _keys_at(coverage: Coverage, sources: list[int], count: int, key_of: Callable[[int, int], str],
             extremes: int) -> list[str]:
    """Keys of the first `extremes` samples of these sources whose count is `count`."""
    keys: list[str] = []
    for source in sources:
        rows = torch.nonzero(coverage.counts[source] == count).flatten()[:extremes - len(keys)]
        keys += [key_of(source, int(row)) for row in rows]
        if len(keys) >= extremes:
            break
    return keys


def coverage_line(summary: dict) -> str:
    """The log line's part (of coverage_extremes or coverage_summary): each task's min-max count, e.g.
    'cover und 3-4 gen 12-15'."""
    return "cover " + " ".join(f"{SHORT[task]} {s['min']}-{s['max']}" for task, s in summary.items())


def write_coverage(path: str | Path, summary: dict) -> None:
    """`summary` (of the counts summed over ranks) as JSON at `path`, whole or not at all: a crash mid-write
    leaves the previous file."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(partial, path)
