"""launchers/slurm/ on a real one-node Slurm on localhost (tests/slurm_harness.py), through the real
sbatch -> srun -> task.sh -> launchers/stage1.py chain, on 2 CPU ranks (DS_ACCELERATOR=cpu) and the tiny model.

Kept short for 2 cores: a 3-step run then a resume to 5 steps; export.sbatch exporting that run's step-3
checkpoint; a run pre-empted with USR1 that requeues itself and finishes; the preprocess job on a Ray cluster
started by the sbatch script, compared with an embedded run; and the 32-node launch rendered for a made-up node
list (no daemons needed).

In-process tests here; the ones that start processes or take long are in tests/integration/test_slurm.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.slurm_harness import KNOBS, SCRIPTS, SlurmUnavailable, ensure_installed
from tests.support import REPO


def sbatch_defaults(script: Path) -> dict[str, str]:
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", script.read_text(), flags=re.M))


@pytest.mark.parametrize("stage, nodes", [(1, 32), (2, 32), (3, 16)])
def test_render_the_default_launch_for_a_made_up_node_list(stage, nodes, tmp_path):
    """Each script's own #SBATCH defaults, rendered through its real rank derivation (common.sh) with real
    `scontrol show hostnames` expanding a made-up node list; no daemon, no srun."""
    try:
        ensure_installed()
    except SlurmUnavailable as why:
        pytest.skip(f"no scontrol: {why}")
    script = SCRIPTS / f"stage{stage}.sbatch"
    defaults = sbatch_defaults(script)
    assert int(defaults["nodes"]) == nodes and defaults["ntasks-per-node"] == defaults["gpus-per-node"] == "8"
    per_node = int(defaults["ntasks-per-node"])
    conf = tmp_path / "slurm.conf"  # scontrol only needs to parse a configuration to expand host lists
    conf.write_text("ClusterName=render\nSlurmctldHost=localhost\nNodeName=localhost\n"
                    "PartitionName=p Nodes=localhost\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM") and k not in KNOBS}
    env.update({"SLURM_CONF": str(conf), "JANUS_RENDER": "1", "JANUS_REPO": str(REPO), "SLURM_JOB_ID": "4242",
                "SLURM_JOB_NODELIST": f"gpu[001-{nodes:03d}]", "SLURM_JOB_NUM_NODES": str(nodes),
                "SLURM_NTASKS_PER_NODE": str(per_node), "SLURM_CPUS_ON_NODE": "128", "DATA": "shards/und shards/gen"})
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    ranks = [dict(kv.split("=", 1) for kv in line.split(" CMD=")[0].split()) for line in done.stdout.splitlines()]
    world = nodes * per_node
    assert len(ranks) == world
    assert sorted(int(r["RANK"]) for r in ranks) == list(range(world))
    assert {r["WORLD_SIZE"] for r in ranks} == {str(world)}
    hosts = [f"gpu{i:03d}" for i in range(1, nodes + 1)]
    for n, host in enumerate(hosts):
        mine = [r for r in ranks if r["host"] == host]
        assert sorted(int(r["LOCAL_RANK"]) for r in mine) == list(range(per_node))
        assert {r["NODE_RANK"] for r in mine} == {str(n)}
        assert {int(r["RANK"]) // per_node for r in mine} == {n}
    assert {(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks} == {("gpu001", str(10000 + 4242))}
    command = done.stdout.splitlines()[0].split(" CMD=")[1]
    assert f"launchers/stage{stage}.py " in command and "--resume auto" in command
    assert "--model" not in command  # MODEL unset: the model --init holds
    assert "--data shards/und shards/gen" in command and "--gpus-per-node 8" in command
    if stage > 1:
        assert f"--init runs/stage{stage - 1}" in command
