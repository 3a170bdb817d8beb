"""What one training sample is, and how it is stored: the Arrow schema shared by writer and reader.

A stored sample holds token ids, not text, so that training never tokenises. Images are kept as
encoded bytes (understanding: the 384x384 padded image) or as VQ ids (generation: 576 ids).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

UNDERSTANDING = "understanding"
TEXT = "text"
GENERATION = "generation"
# Order of the data ratio und : text : gen in the paper's Table 2; per-task losses use this order.
TASKS = (UNDERSTANDING, TEXT, GENERATION)
TASK_INDEX = {task: i for i, task in enumerate(TASKS)}

SCHEMA_VERSION = 1

SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        # und: placeholders already expanded to <boi> 576 x <image_placeholder> <eoi>;
        # gen: the prompt through <begin_of_image>; text: the whole piece.
        pa.field("input_ids", pa.list_(pa.int32()), nullable=False),
        # [start, end) token ranges whose tokens are LM-head targets (answers + EOS, or all text).
        pa.field("loss_spans", pa.list_(pa.struct([("start", pa.int32()), ("end", pa.int32())])),
                 nullable=False),
        # gen: tokens strictly between BOS and <begin_of_image>, replaced by pad for guidance dropout.
        pa.field("prompt_start", pa.int32()),
        pa.field("prompt_end", pa.int32()),
        pa.field("images", pa.list_(pa.binary()), nullable=False),
        pa.field("image_ids", pa.list_(pa.int16())),
    ],
    metadata={b"janus_sample_schema_version": str(SCHEMA_VERSION).encode()},
)


@dataclass
class Sample:
    """One tokenised sample of any task; see SAMPLE_SCHEMA for what each field holds."""

    task: str
    input_ids: list[int]
    loss_spans: list[tuple[int, int]] = field(default_factory=list)
    prompt_span: tuple[int, int] | None = None
    images: list[bytes] = field(default_factory=list)
    image_ids: list[int] | None = None
    key: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASK_INDEX:
            raise ValueError(f"unknown task {self.task!r}; expected one of {TASKS}")
        if self.task == GENERATION and not self.image_ids:
            raise ValueError("a generation sample needs its VQ image ids")

    def to_row(self) -> dict:
        start, end = self.prompt_span if self.prompt_span else (None, None)
        return {
            "key": self.key,
            "task": self.task,
            "input_ids": self.input_ids,
            "loss_spans": [{"start": s, "end": e} for s, e in self.loss_spans],
            "prompt_start": start,
            "prompt_end": end,
            "images": self.images,
            "image_ids": self.image_ids,
        }

    @classmethod
    def from_row(cls, row: dict) -> Sample:
        prompt = None if row["prompt_start"] is None else (row["prompt_start"], row["prompt_end"])
        return cls(
            task=row["task"],
            input_ids=list(row["input_ids"]),
            loss_spans=[(s["start"], s["end"]) for s in row["loss_spans"]],
            prompt_span=prompt,
            images=list(row["images"]),
            image_ids=None if row["image_ids"] is None else list(row["image_ids"]),
            key=row["key"],
        )


def samples_to_table(samples: list[Sample]) -> pa.Table:
    """An Arrow table in SAMPLE_SCHEMA; the one way samples become Arrow."""
    return pa.Table.from_pylist([s.to_row() for s in samples], schema=SAMPLE_SCHEMA)


def samples_from_table(table: pa.Table) -> list[Sample]:
    if table.schema.remove_metadata() != SAMPLE_SCHEMA.remove_metadata():
        raise ValueError(f"table schema differs from the Janus sample schema:\n{table.schema}")
    return [Sample.from_row(row) for row in table.to_pylist()]
