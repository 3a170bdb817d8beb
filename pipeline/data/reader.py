"""Reading preprocessed shards: one `Source` per manifest, this rank's rows of it, epoch after epoch.

Ranks partition by row, not by shard, so a source with fewer shards than ranks starves nobody.
Each epoch has its own seeded order: shards are shuffled, then rows within each shard; rank r takes
every world-th row of that order. The position in it is the whole reader state. A shard is verified
against its manifest (sha256, schema version) the first time it is opened, not all at start.

A run resumed on another number of ranks (`Source.continue_from`) keeps, per epoch the old ranks were part-way
through, what they had read: those rows leave that epoch's order and the new ranks share what is left. So within
an epoch every row is read exactly once, whatever the world sizes of the runs that read it.
"""

from __future__ import annotations

import bisect
import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from model.manifest import Manifest, file_problem, read_shard
from model.sample import SAMPLE_SCHEMA, SCHEMA_VERSION, Sample


@dataclass(frozen=True)
class SourceSpec:
    """A dataset: a manifest (file or directory) and its weight among the sources of its task."""

    manifest: str
    weight: float = 1.0


class FingerprintMismatch(ValueError):
    pass


class Source:
    def __init__(self, spec: SourceSpec, rank: int, world_size: int, seed: int,
                 tokenizer_fingerprint: str | None = None, vq_fingerprint: str | None = None,
                 allow_fingerprint_mismatch: bool = False, verified: bool = False):
        path = Path(spec.manifest)
        self.root = path if path.is_dir() else path.parent
        self.manifest = Manifest.read(path)
        self.task = self.manifest.task
        self.weight = spec.weight
        self.name = str(path)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.verified = verified  # every shard's sha256 already checked, once for the whole job (shard_problems)
        if not allow_fingerprint_mismatch:
            self._check_fingerprint("tokenizer", self.manifest.tokenizer_fingerprint, tokenizer_fingerprint)
            self._check_fingerprint("VQ", self.manifest.vq_fingerprint, vq_fingerprint)
        self.rows = [s.rows for s in self.manifest.shards]
        self._starts = [0, *np.cumsum(self.rows).tolist()]  # global row id of each shard's first row
        if sum(self.rows) < world_size:
            raise ValueError(f"{self.name}: {sum(self.rows)} rows cannot feed {world_size} ranks")
        self._tables: dict[int, pa.Table] = {}
        self.epoch, self.cursor = 0, 0  # cursor: index into this rank's rows of the epoch order
        # What the ranks of earlier world sizes read of epochs they left part-read, oldest resize first: each
        # {"world": W, "epoch": first epoch, "read": [[rows read by each of the W ranks] per epoch from there]}.
        self.resized: list[dict] = []
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)

    def _check_fingerprint(self, what: str, shard_value: str | None, model_value: str | None) -> None:
        if shard_value is not None and model_value is not None and shard_value != model_value:
            raise FingerprintMismatch(
                f"{self.name}: shards were made with {what} fingerprint {shard_value[:16]}..., the model's is "
                f"{model_value[:16]}...; re-run preprocessing with the model's {what}, or pass "
                f"allow_fingerprint_mismatch (--allow-fingerprint-mismatch) if you know they are compatible")

    def _epoch_order(self, epoch: int) -> np.ndarray:
        """Global row ids of `epoch` in this rank's order (rank r: positions r, r + world, ...), less the rows that
        ranks of earlier world sizes read of it."""
        if self._order_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            order = np.concatenate([self._starts[s] + rng.permutation(self.rows[s])
                                    for s in rng.permutation(len(self.rows))])
            for layer in self.resized:  # each resize's counts index the order the ones before it left
                if layer["epoch"] <= epoch < layer["epoch"] + len(layer["read"]):
                    order = order[unread(len(order), layer["world"], layer["read"][epoch - layer["epoch"]])]
            self._order = order[self.rank::self.world_size]
            self._order_epoch = epoch
        return self._order

    def next_ref(self) -> tuple[int, int]:
        """(epoch, global row id) of this rank's next row; epochs roll over forever."""
        order = self._epoch_order(self.epoch)
        # An epoch that earlier ranks read all but a few rows of may leave this rank none; any other epoch gives
        # every rank a row (rows >= ranks, checked above), so this ends within the resized epochs plus one.
        for _ in range(sum(len(layer["read"]) for layer in self.resized) + 1):
            if self.cursor < len(order):
                break
            self.epoch, self.cursor = self.epoch + 1, 0
            order = self._epoch_order(self.epoch)
        ref = (self.epoch, int(order[self.cursor]))
        self.cursor += 1
        return ref

    @property
    def size(self) -> int:
        """Rows in the whole source, every shard (every rank's rows)."""
        return self._starts[-1]

    def sample(self, row_id: int) -> Sample:
        shard = bisect.bisect_right(self._starts, row_id) - 1
        table = self._table(shard)
        return Sample.from_row(table.slice(row_id - self._starts[shard], 1).to_pylist()[0])

    def key(self, row_id: int) -> str:
        """The sample's key alone (coverage names a few samples: no need to decode them)."""
        shard = bisect.bisect_right(self._starts, row_id) - 1
        return self._table(shard).column("key")[row_id - self._starts[shard]].as_py()

    def _table(self, shard: int) -> pa.Table:
        if shard not in self._tables:
            entry = self.manifest.shards[shard]
            path = self.root / entry.file
            problem = None if self.verified else file_problem(path, entry.sha256, entry.bytes)
            if problem:
                raise ValueError(f"{path} {problem} (recorded in its manifest): a corrupt or replaced shard")
            table = read_shard(path)
            version = (table.schema.metadata or {}).get(b"janus_sample_schema_version", b"").decode()
            if version != str(SCHEMA_VERSION) or not table.schema.remove_metadata().equals(
                    SAMPLE_SCHEMA.remove_metadata()):
                raise ValueError(f"{path}: schema version {version!r} / schema differs from this code's "
                                 f"{SCHEMA_VERSION}")
            if table.num_rows != entry.rows:
                raise ValueError(f"{path}: {table.num_rows} rows, manifest says {entry.rows}")
            self._tables[shard] = table
        return self._tables[shard]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "resized": copy.deepcopy(self.resized)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self.resized = copy.deepcopy(state.get("resized", []))  # absent in checkpoints from before resizing
        self._order_epoch = -1

    def continue_from(self, states: list[dict]) -> None:
        """Continue after the states of every rank (in rank order) of a run with another world size.

        This rank starts at the earliest epoch any old rank was in, and every epoch some old rank was part-way
        through gets the old ranks' read counts as a new layer of `resized`: those rows leave the epoch's order
        and the new ranks divide the rest. Rows an old rank drew but had not trained yet (its packer buffer) are
        not read again here: the data pipeline hands them on."""
        first, last = min(s["epoch"] for s in states), max(s["epoch"] for s in states)
        everything = sum(self.rows)  # at least any rank's share of an epoch: an old rank past it read all of it
        read = [[everything if s["epoch"] > epoch else s["cursor"] if s["epoch"] == epoch else 0 for s in states]
                for epoch in range(first, last + 1)]
        earlier = [trimmed for layer in states[0].get("resized", []) if (trimmed := _from_epoch(layer, first))]
        self.load_state_dict({"epoch": first, "cursor": 0,
                              "resized": [*earlier, {"world": len(states), "epoch": first, "read": read}]})


def unread(n: int, world: int, read: list[int]) -> np.ndarray:
    """Which of an epoch order's `n` positions `world` ranks had not read, rank r having read the first read[r] of
    its positions (r, r + world, ...)."""
    position = np.arange(n)
    return position // world >= np.asarray(read, dtype=np.int64)[position % world]


def _from_epoch(layer: dict, epoch: int) -> dict | None:
    """A resize layer without the epochs before `epoch` (nobody reads them again); None if nothing is left."""
    skip = max(0, epoch - layer["epoch"])
    if skip >= len(layer["read"]):
        return None
    return {**layer, "epoch": layer["epoch"] + skip, "read": layer["read"][skip:]}


def shard_problems(manifests: list[str], rank: int = 0, world_size: int = 1) -> list[str]:
    """This rank's share of every shard the manifests list (shard k of all of them goes to rank k % world_size),
    checked against its manifest entry's sha256; run by every rank and gathered, each shard is hashed once for
    the whole job instead of once by every rank that reads it."""
    shards = []
    for manifest in manifests:
        root = Path(manifest) if Path(manifest).is_dir() else Path(manifest).parent
        shards += [(root / e.file, e.sha256, e.bytes) for e in Manifest.read(manifest).shards]
    found = ((path, file_problem(path, sha256, size)) for path, sha256, size in shards[rank::world_size])
    return [f"{path} {problem} (recorded in its manifest)" for path, problem in found if problem]


def shared_prompt_notes(manifests: list[str]) -> list[str]:
    """A line per generation dataset whose manifest counts rows sharing their prompt with another row: each such prompt
    is trained towards the mixture of its images, so none of them comes back from the prompt alone."""
    notes = []
    for path in manifests:
        manifest = Manifest.read(path)
        if manifest.rows_sharing_a_prompt:
            notes.append(f"note: {path}: {manifest.rows_sharing_a_prompt:,} of {manifest.rows_written:,} generation "
                         f"rows share their prompt with another row ({manifest.distinct_prompts:,} distinct prompts); "
                         "each such prompt learns the mixture of its images (right for class names, not for captions)")
    return notes
