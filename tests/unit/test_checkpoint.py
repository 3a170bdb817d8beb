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


def test_a_complete_that_lists_no_files_or_not_every_file_is_refused(tmp_path):
    """A COMPLETE of ours that lists nothing vouches for nothing; a file it does not list is never loaded unchecked."""
    from pipeline.checkpoint import WRITER, written_here

    empty = fake_checkpoint(tmp_path, 2, {"model_states.pt": b"pickled"})
    (empty / COMPLETE).write_text(json.dumps({"writer": WRITER, "step": 2, "world_size": 1, "files": {}}))
    assert not written_here(empty)
    assert problems(empty) and "--trust-checkpoint" in problems(empty)[0]
    partly = fake_checkpoint(tmp_path, 4, {"rank-0.pt": b"state"})
    (partly / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"pickled")  # added after its COMPLETE
    assert problems(partly) == ["zero_pp_rank_0_mp_rank_00_model_states.pt is not listed in its COMPLETE"]


def test_checkpoint_files_load_as_data_and_a_payload_is_refused_unrun(tmp_path):
    """What DeepSpeed pickles beside tensors loads with weights_only=True; a file carrying code is refused, even
    through a call that asks for weights_only=False as DeepSpeed's do, and the code never runs."""
    import pytest
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from pipeline.safe_load import UnsafeCheckpoint, WeightsOnlyCheckpointEngine, weights_only_loads
    from tests.support import with_payload

    file = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    saved = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0), "step": torch.tensor(3.0),
             "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]}
    torch.save(saved, file, _use_new_zipfile_serialization=False)  # DeepSpeed's default serialization
    with weights_only_loads(file):
        WeightsOnlyCheckpointEngine().load(str(file))  # the engine's own load, nested as in a universal resume
        loaded = torch.load(file, weights_only=False)
    assert loaded["zero_stage"] == ZeroStageEnum.weights and loaded["loss_scaler"].cur_scale == 1.0
    marker = tmp_path / "payload-ran"
    with_payload(file, marker)
    with pytest.raises(UnsafeCheckpoint, match=f"{file}: refused to load.*GLOBAL io.open is not allowed"):
        with weights_only_loads(file):
            torch.load(file, weights_only=False)
    assert not marker.exists()
