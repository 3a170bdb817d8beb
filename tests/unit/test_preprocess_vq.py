"""`--vq DIR`: a JanusVQVAE directory, or the VQ of a whole Janus checkpoint in either layout (no Ray here)."""

from __future__ import annotations

import pytest
import torch
from transformers.models.janus.modeling_janus import JanusVQVAE

from model.config import preset_config
from model.janus import JanusProForTraining
from model.vq import load_vq


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_vq_from_vqvae_dir_and_both_checkpoint_layouts(tmp_path):
    from model import weights

    torch.manual_seed(0)
    model = JanusProForTraining(preset_config("tiny")).eval()
    vq = model.model.vqmodel
    vq.save_pretrained(tmp_path / "vqvae")
    assert same_weights(load_vq(tmp_path / "vqvae"), vq)
    for layout in ("transformers", "original"):
        weights.save_checkpoint(model, tmp_path / layout, layout=layout)
        loaded = load_vq(tmp_path / layout)
        assert isinstance(loaded, JanusVQVAE) and same_weights(loaded, vq), layout


def test_load_vq_refuses_a_directory_without_a_vq(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vq(tmp_path)


@pytest.mark.parametrize("gpus", [0, 1, 8])
def test_the_vq_actors_always_leave_a_shard_task_room_to_run(gpus):
    """A generation job's reader task and its VQ actors must fit the machine together, or the actors wait for rows
    no task can be scheduled to read: `--cpus 1` once waited forever (actor and task each asked for the one CPU)."""
    from preprocess.job import ConvertConfig, JobConfig, task_resources, vq_resources

    for cpus in range(max(1, gpus), 17):
        for actors in (0, 1, 2, 4, 16):
            for pending in (1, 3, 100):
                cfg = JobConfig(inputs=[], output="", convert=ConvertConfig(task="generation", tokenizer=""),
                                vq_actors=actors)
                res = vq_resources(cfg, cpus, gpus)
                held = res["concurrency"] * res["num_cpus"]
                task_cpus, threads = task_resources([cpus], pending, held)
                assert 0 < task_cpus <= threads and held + task_cpus <= cpus, (cpus, actors, pending, res, task_cpus)
                assert threads <= cpus and (res["num_cpus"] == 1 or held <= cpus / 2)
