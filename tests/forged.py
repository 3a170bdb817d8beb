"""A forged checkpoint: a real one whose DeepSpeed file also carries a pickle payload, re-listed in its COMPLETE as
anyone who can write a run directory could (the tests of the trust model: tests/unit/test_checkpoint.py,
tests/integration/test_export.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


class Payload:
    """Unpickled, it creates `marker` (the side effect a test looks for): pickle calls open(marker, "w")."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def with_payload(file: Path, marker: Path) -> None:
    """`file` (a torch.save'd dict) with one more entry that, unpickled, creates `marker`."""
    from pipeline.safe_load import ALLOWED

    with torch.serialization.safe_globals(ALLOWED):
        state = torch.load(file, weights_only=True)
    torch.save({**state, "note": Payload(marker)}, file)


def relisted(step: Path) -> None:
    """Its COMPLETE rewritten as this code writes it, listing the files as they now are."""
    from pipeline.checkpoint import COMPLETE, WRITER, file_records

    marker = json.loads((step / COMPLETE).read_text())
    (step / COMPLETE).write_text(json.dumps({**marker, "writer": WRITER, "files": file_records(step)}))


def forged_run(run: Path, to: Path, marker: Path) -> Path:
    """A copy of run `run` at `to` whose latest checkpoint's model states carry a payload; its COMPLETE lists them."""
    from pipeline.checkpoint import latest_checkpoint

    shutil.copytree(run, to)
    step = latest_checkpoint(to)
    with_payload(sorted(step.glob("*model_states.pt"))[0], marker)
    relisted(step)
    return to
