"""Each rank binds its CUDA device before its first collective (issue 25, 2), on the CPU with a stand-in torch.cuda.

`main` is run up to `deepspeed.init_distributed` (a stand-in that records the order of calls, then stops the run):
the device must already be set there, since NCCL builds its communicator on the current device and every collective
after it (the shard check's all_gather_object first) runs there.
"""

import os
from types import SimpleNamespace

import deepspeed
import pytest
import torch

import pipeline.train as train


class Stop(Exception):
    """Raised by the stand-in init_distributed: the test has seen what it needs."""


@pytest.fixture
def cuda(monkeypatch):
    """A stand-in torch.cuda with `visible` GPUs; `calls` records set_device and init_distributed in order."""
    calls: list[tuple] = []

    def visible(count: int) -> list[tuple]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
        return calls

    def init_distributed(dist_backend, **_):
        calls.append(("init_distributed", dist_backend))
        raise Stop

    monkeypatch.setattr(deepspeed, "init_distributed", init_distributed)
    config = SimpleNamespace(system=SimpleNamespace(collective_timeout_seconds=60))
    args = SimpleNamespace(dry_run=False, write_ds_config=None)
    monkeypatch.setattr(train, "resolve", lambda stage, argv: (config, args))
    monkeypatch.setattr(train, "preflight", lambda config, world_size: SimpleNamespace())
    monkeypatch.setattr(train, "launcher_world_size", lambda: 16)
    return visible


def run_main_to_init_distributed() -> None:
    with pytest.raises(Stop):
        train.main(1, [])


def test_eight_gpus_visible_per_task_bind_cuda_local_rank_before_init_distributed(cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")
    calls = cuda(8)
    run_main_to_init_distributed()
    assert calls == [("set_device", 5), ("init_distributed", "nccl")]
    calls.clear()
    assert train.bind_device() == torch.device("cuda", 5)


def test_one_gpu_visible_per_task_binds_cuda_0_before_init_distributed(cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "5")  # Slurm's SLURM_LOCALID with --gpus-per-task=1
    calls = cuda(1)
    run_main_to_init_distributed()
    assert calls == [("set_device", 0), ("init_distributed", "nccl")]
    # DeepSpeed's zero.Init and engine bind cuda:LOCAL_RANK themselves: it must name the same device.
    assert os.environ["LOCAL_RANK"] == "0"
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert train.bind_device() == torch.device("cuda", 0)


def test_a_local_rank_beyond_the_visible_gpus_is_refused_naming_both(cuda, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_RANK", "5")
    calls = cuda(4)
    with pytest.raises(SystemExit) as exit_:
        train.main(1, [])
    assert exit_.value.code == 2 and calls == []  # no device set, no process group started
    assert "LOCAL_RANK 5 but this rank sees 4 GPUs" in capsys.readouterr().err


def test_without_cuda_the_cpu_and_gloo(cuda, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    calls = cuda(0)
    run_main_to_init_distributed()
    assert calls == [("init_distributed", "gloo")]
    assert train.bind_device() == torch.device("cpu")
