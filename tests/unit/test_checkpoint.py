"""Checkpoints you can trust: every file listed with its size and sha256, damage found by name, rollbacks set
newer checkpoints aside instead of deleting them (single process here; 2-rank runs in
tests/integration/test_training.py)."""

import json

from pipeline.checkpoint import COMPLETE, latest_intact, problems, set_aside_after
from tests.support import fake_checkpoint


def test_every_file_is_listed_and_damage_is_named(tmp_path):
    files = {"zero/optim_states.pt": b"adam" * 1000, "model_states.pt": b"weights" * 100, "rank-0.pt": b"data"}
    path = fake_checkpoint(tmp_path, 2, files)
    assert sorted(json.loads((path / COMPLETE).read_text())["files"]) == sorted(files)
    assert problems(path) == []
    flipped = bytearray(files["model_states.pt"])
    flipped[10] ^= 1
    (path / "model_states.pt").write_bytes(bytes(flipped))
    (path / "zero/optim_states.pt").write_bytes(files["zero/optim_states.pt"][:100])
    (path / "rank-0.pt").unlink()
    assert problems(path) == ["model_states.pt does not match its sha256", "rank-0.pt is missing",
                              "zero/optim_states.pt has 100 bytes, not 4000"]


def test_a_foreign_checkpoint_is_refused_unless_trusted(tmp_path):
    path = fake_checkpoint(tmp_path, 2, {"model_states.pt": b"pickled"}, ours=False)
    assert problems(path) and "--trust-checkpoint" in problems(path)[0]
    assert problems(path, trust=True) == []


def test_resume_takes_the_newest_intact_checkpoint_and_reports_the_damaged(tmp_path):
    reports: list[str] = []
    intact = fake_checkpoint(tmp_path, 2, {"a.pt": b"1"})
    damaged = fake_checkpoint(tmp_path, 4, {"a.pt": b"2"})
    (damaged / "a.pt").write_bytes(b"3")
    assert latest_intact(tmp_path, report=reports.append) == intact
    assert len(reports) == 1 and str(damaged) in reports[0] and "a.pt does not match" in reports[0]


def test_rolling_back_sets_newer_checkpoints_aside_and_deletes_nothing(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step, {"a.pt": bytes([step])})
    torn = tmp_path / "checkpoints" / "step-00000008"
    torn.mkdir()  # a save that never finished
    moved = set_aside_after(tmp_path, 2)
    assert [p.name for p in moved] == ["step-00000004", "step-00000006", "step-00000008"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert all(p.parent == tmp_path / "checkpoints" / "abandoned" and p.is_dir() for p in moved)
    fake_checkpoint(tmp_path, 4, {"a.pt": b"again"})  # the same step set aside twice keeps both
    assert set_aside_after(tmp_path, 2)[0].name == "step-00000004.1"
