"""launchers/slurm/ on a real one-node Slurm on localhost (tests/slurm_harness.py), through the real
sbatch -> srun -> task.sh -> launchers/stage1.py chain, on 2 CPU ranks (DS_ACCELERATOR=cpu) and the tiny model.

Kept short for 2 cores: a 3-step run then a resume to 5 steps; export.sbatch exporting that run's step-3
checkpoint; a run pre-empted with USR1 that requeues itself and finishes; the preprocess job on a Ray cluster
started by the sbatch script, compared with an embedded run; and the 32-node launch rendered for a made-up node
list (no daemons needed).

Tests that start processes or take long here; the in-process ones are in tests/unit/test_slurm.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from model.manifest import Manifest
from pipeline.checkpoint import latest_checkpoint
from tests.slurm_harness import KNOBS, SCRIPTS, LocalSlurm, SlurmUnavailable, start_local_slurm
from tests.support import REPO, encoded, write_tar

# One node, two CPU ranks, no GPU: the override a user would type for a laptop-sized test.
SMALL = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--time=30"]
TRAIN_FLAGS = "--seq-len 1400 --rows-per-step 2 --log-every 1 --num-workers 1"
# A job in one of these states has ended for good (a requeued one passes through PENDING on its way back).
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = start_local_slurm()
    except SlurmUnavailable as why:
        pytest.skip(f"no local Slurm: {why}")
    try:
        yield cluster
    finally:
        cluster.stop()


def job_env(slurm: LocalSlurm, **knobs: str) -> dict[str, str]:
    env = {k: v for k, v in slurm.env.items() if k not in KNOBS}
    env.update({"JANUS_REPO": str(REPO), "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
    env.update(knobs)
    return env


def train_knobs(shard_corpus, tokenizer_dir, output: Path, steps: int) -> dict[str, str]:
    return {"MODEL": "tiny", "DATA": f"{shard_corpus['understanding']} {shard_corpus['generation']}",
            "TOKENIZER": str(tokenizer_dir), "INIT": "", "OUTPUT": str(output), "SAVE_EVERY": "100",
            "EXTRA_ARGS": f"--train-steps {steps} {TRAIN_FLAGS}"}


def log_of(workdir: Path, job_id: str, script: str = "stage1.sbatch") -> Path:
    """Where the script's `--output=logs/%x-%j.out` puts the job's log (%x: its --job-name, janus-STEM)."""
    return workdir / "logs" / f"janus-{Path(script).stem}-{job_id}.out"


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else f"(no {path})"


def sbatch(slurm: LocalSlurm, script: str, env: dict, workdir: Path, *flags: str, wait: bool = True,
           timeout: float = 240) -> str:
    """Submit from `workdir` (its logs/ is where the scripts' `--output=logs/%x-%j.out` lands); the job id."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", *(["--wait"] if wait else []), *flags, str(SCRIPTS / script)]
    try:
        done = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        job = (e.stdout or b"").decode().strip() if isinstance(e.stdout, bytes) else (e.stdout or "").strip()
        slurm.run(["scancel", job], check=False)
        pytest.fail(f"{script} did not finish in {timeout}s\n{read(log_of(workdir, job, script))[-6000:]}")
    job = done.stdout.strip().split(";")[0]
    assert done.returncode == 0, f"{script}: sbatch exited {done.returncode}: {done.stderr}\n" \
                                 f"{read(log_of(workdir, job, script))[-6000:]}\n{slurm.logs()}"
    return job


def wait_for(predicate, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}\n{read(log)[-6000:]}")
        time.sleep(1)


@dataclass
class Stage1Run:
    output: Path            # the run directory (OUTPUT)
    workdir: Path           # where the jobs were submitted from (their logs/)
    jobs: list[str]         # the 3-step submission, then the resume to 5 steps
    states: list[str]       # each job's JobState right after it ended
    latest: list[str]       # the run's latest complete checkpoint after each job


@pytest.fixture(scope="module")
def stage1_run(slurm, shard_corpus, tokenizer_dir, tmp_path_factory) -> Stage1Run:
    """stage1.sbatch for 3 steps, then a second submission that resumes to 5: the resume test asserts on it and
    the export test exports its step-3 checkpoint (kept: --keep-last defaults to 3), so it is trained once."""
    workdir = tmp_path_factory.mktemp("stage1")
    run = Stage1Run(output=workdir / "run", workdir=workdir, jobs=[], states=[], latest=[])
    for steps in (3, 5):
        job = sbatch(slurm, "stage1.sbatch", job_env(slurm, **train_knobs(shard_corpus, tokenizer_dir, run.output,
                                                                          steps)), workdir, *SMALL)
        latest = latest_checkpoint(run.output)
        run.jobs.append(job)
        run.states.append(slurm.job(job).get("JobState", "(forgotten)"))
        run.latest.append(latest.name if latest else "(none)")
    return run


@pytest.mark.integration
def test_stage1_runs_then_a_second_submission_resumes(stage1_run):
    run = stage1_run
    first, second = run.jobs
    log = read(log_of(run.workdir, first))
    assert run.states[0] == "COMPLETED", log[-6000:]
    assert "2 ranks, rendezvous localhost:" in log and "0: done at step 3" in log, log[-6000:]
    assert "[slurm] every rank finished: done (restart 0)" in log, log[-6000:]
    assert run.latest[0] == "step-00000003"

    log = read(log_of(run.workdir, second))
    assert run.states[1] == "COMPLETED", log[-6000:]
    assert f"resumed from {run.output / 'checkpoints' / 'step-00000003'} at step 3" in log, log[-6000:]
    assert "0: step       4 " in log and "0: step       1 " not in log, log[-6000:]
    assert run.latest[1] == "step-00000005"


@pytest.mark.integration
def test_export_sbatch_writes_a_loadable_export_of_the_chosen_step(slurm, stage1_run, tmp_path):
    """export.sbatch with its documented knobs on the resumed run's older checkpoint (STEP=3, not the latest);
    EXTRA_ARGS unset, so the script's empty extra-args array is expanded under `set -u` too."""
    from transformers import JanusForConditionalGeneration

    from pipeline.checkpoint import consolidated_state

    out = tmp_path / "export"
    source = stage1_run.output / "checkpoints" / "step-00000003"
    env = job_env(slurm, CHECKPOINT=str(stage1_run.output), EXPORT_OUT=str(out), LAYOUT="transformers", STEP="3")
    job = sbatch(slurm, "export.sbatch", env, tmp_path, "--time=30", timeout=300)
    log = read(log_of(tmp_path, job, "export.sbatch"))
    assert slurm.job(job).get("JobState") == "COMPLETED", log[-6000:]
    assert f"exported {source} -> {out} (transformers layout, bf16," in log, log[-6000:]
    assert json.loads((out / "export.json").read_text())["source"] == str(source.resolve())
    assert not out.with_name(out.name + ".partial").exists()

    # Sharded safetensors with an index naming exactly the shards on disk, and a config: what from_pretrained reads.
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in out.glob("model-*-of-*.safetensors")} != set()
    assert (out / "config.json").is_file()
    model, info = JanusForConditionalGeneration.from_pretrained(str(out), dtype=torch.bfloat16,
                                                                output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info

    # Every tensor equals DeepSpeed's consolidation of the 2-rank ZeRO-3 checkpoint at step 3, cast to bf16.
    state, loaded = consolidated_state(source), model.state_dict()
    assert sorted(loaded) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name


@pytest.mark.integration
def test_preemption_signal_checkpoints_requeues_and_finishes(slurm, shard_corpus, tokenizer_dir, tmp_path):
    """USR1 to the batch shell, exactly what `#SBATCH --signal=B:USR1@600` delivers before the time limit."""
    output, steps = tmp_path / "run", 12
    env = job_env(slurm, **train_knobs(shard_corpus, tokenizer_dir, output, steps))
    job = sbatch(slurm, "stage1.sbatch", env, tmp_path, *SMALL, wait=False)
    log = log_of(tmp_path, job)
    # Signal once training runs (its handler is installed by then), as a time limit 10 minutes away would.
    wait_for(lambda: "0: step       1 " in read(log), 180, "the first training step", log)
    slurm.run(["scancel", "--signal=USR1", "--batch", job])
    wait_for(lambda: slurm.job(job).get("JobState") in FINAL, 240, "the requeued job to finish", log)
    text, info = read(log), slurm.job(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-6000:]}"
    stopped = re.search(r"stop signal: checkpointed step (\d+), exiting", text)
    assert stopped and 1 <= int(stopped.group(1)) < steps, text[-6000:]
    at = int(stopped.group(1))
    assert f"checkpointed after USR1 (time limit or pre-emption): requeueing job {job} (restart 1 of at most " \
        in text and f"job {job} restart 1 " in text, text[-6000:]
    assert f"resumed from {output / 'checkpoints' / f'step-{at:08d}'} at step {at}" in text, text[-6000:]
    assert f"0: done at step {steps}" in text, text[-6000:]
    assert latest_checkpoint(output).name == f"step-{steps:08d}"


def wait_until_ended(slurm: LocalSlurm, job: str, log: Path, timeout: float) -> dict[str, str]:
    """The job's `scontrol show job` fields once it has ended for good; cancelled if it has not in `timeout`."""
    try:
        wait_for(lambda: slurm.job(job).get("JobState") in FINAL, timeout, f"job {job} to end", log)
    finally:
        if slurm.job(job).get("JobState") not in FINAL:
            slurm.run(["scancel", job], check=False)
    return slurm.job(job)


def fake_python(tmp_path: Path, body: str) -> Path:
    """A PYTHON for the sbatch scripts that runs `body` (bash, per rank: SLURM_PROCID) instead of, or before,
    the real interpreter: how a test makes one rank die, or start late."""
    script = tmp_path / "python"
    script.write_text(f"#!/usr/bin/env bash\n{body}\n")
    script.chmod(0o755)
    return script


def rank_process(output: Path, rank: int) -> int:
    """The pid of `rank`'s training process: the python running launchers/stage1.py into `output` with
    RANK=`rank` whose parent is not such a process too (that one is a data-loader worker)."""
    def details(pid: str) -> tuple[list[str], list[bytes], str]:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]
        except OSError:
            return [], [], ""
        return argv, environ, parent

    ranks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        argv, environ, parent = details(pid)
        if ("launchers/stage1.py" in argv and str(output) in argv and "bash" not in Path(argv[0]).name
                and f"RANK={rank}".encode() in environ):
            ranks[pid] = parent
    main = [pid for pid, parent in ranks.items() if parent not in ranks]
    if len(main) != 1:
        raise LookupError(f"expected one rank {rank} training process for {output}, found {main}")
    return int(main[0])


def metric_steps(output: Path) -> list[int]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


@pytest.mark.integration
def test_a_hung_rank_times_out_requeues_and_resumes_from_the_last_complete_checkpoint(
        slurm, shard_corpus, tokenizer_dir, tmp_path):
    """Rank 1 is stopped (SIGSTOP) once a checkpoint is complete: rank 0's next collective times out
    (--collective-timeout-seconds, short here), the step fails, the script requeues the job and the requeued
    job resumes from the newest complete checkpoint and finishes."""
    output, steps = tmp_path / "run", 8
    knobs = train_knobs(shard_corpus, tokenizer_dir, output, steps)
    knobs.update(SAVE_EVERY="2", MAX_RESTARTS="2")
    knobs["EXTRA_ARGS"] += " --collective-timeout-seconds 30"
    job = sbatch(slurm, "stage1.sbatch", job_env(slurm, **knobs), tmp_path, *SMALL, wait=False)
    log = log_of(tmp_path, job)
    stopped = None
    try:
        wait_for(lambda: latest_checkpoint(output) is not None, 300, "the first complete checkpoint", log)
        first = latest_checkpoint(output)
        stopped = rank_process(output, 1)
        os.kill(stopped, signal.SIGSTOP)
        wait_for(lambda: f"requeueing job {job}" in read(log) or slurm.job(job).get("JobState") in FINAL, 240,
                 "the step to fail", log)
        assert f"requeueing job {job}" in read(log), f"{slurm.job(job)}\n{read(log)[-8000:]}"
        at = int(latest_checkpoint(output).name.split("-")[1])  # the step ended: no rank saves any more
        info = wait_until_ended(slurm, job, log, 400)
    finally:
        if stopped is not None:
            try:
                os.kill(stopped, signal.SIGCONT)  # lets Slurm's SIGTERM end it if it is still there
            except ProcessLookupError:
                pass
    text = read(log)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", f"{info}\n{text[-8000:]}"
    assert at >= int(first.name.split("-")[1]), text[-8000:]
    # gloo's words for a timed-out collective depend on where rank 0 waited: a blocking receive says how long it
    # waited, an asynchronous handle (ZeRO-3's coalesced all-gather after the step) that its pair was closed.
    timed_out = ("Timed out waiting 30000ms", "Application timeout caused pair closure")
    assert "0: [rank0]: RuntimeError: " in text and any(t in text for t in timed_out), text[-8000:]
    assert re.search(rf"step failed with status \d+ and no rank refused its inputs \(a rank died or hung, or a "
                     rf"node failed\): requeueing job {job} \(restart 1 of at most 2\)", text), text[-8000:]
    assert f"job {job} restart 1 " in text, text[-8000:]
    assert f"resumed from {output / 'checkpoints' / f'step-{at:08d}'} at step {at}" in text, text[-8000:]
    assert f"0: done at step {steps}" in text, text[-8000:]
    # metrics.jsonl is appended to: the first run's steps (at least up to the checkpoint), then the resumed
    # run's from the checkpoint on.
    logged = metric_steps(output)
    first_run = len(logged) - (steps - at)
    assert first_run >= at and logged[:first_run] == list(range(1, first_run + 1)), logged
    assert logged[first_run:] == list(range(at + 1, steps + 1)), logged
    assert latest_checkpoint(output).name == f"step-{steps:08d}"


@pytest.mark.integration
def test_a_config_error_is_never_requeued_even_when_srun_reports_a_kill(slurm, shard_corpus, tokenizer_dir,
                                                                       tmp_path):
    """A missing data directory: rank 0 exits 2 in its start-up checks while rank 1 is still starting (made
    late here), so the step's SIGTERM kills rank 1 and srun reports that kill, not the 2: the refusal recorded
    by task.sh must still win."""
    output, missing = tmp_path / "run", tmp_path / "no-such-shards"
    knobs = train_knobs(shard_corpus, tokenizer_dir, output, 3)
    knobs.update(DATA=f"{missing} {shard_corpus['generation']}", PYTHON=str(fake_python(
        tmp_path, f'[[ "$SLURM_PROCID" == 1 ]] && sleep 300\nexec {sys.executable} "$@"')))
    job = sbatch(slurm, "stage1.sbatch", job_env(slurm, **knobs), tmp_path, *SMALL, wait=False)
    log = log_of(tmp_path, job)
    info, text = wait_until_ended(slurm, job, log, 240), read(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0" and info["ExitCode"] == "2:0", \
        f"{info}\n{text[-6000:]}"
    assert f"0: error: --data {missing}: no such file or directory" in text, text[-6000:]
    said = re.search(r"\[slurm\] rank\(s\) 0 exited 2: a config or data error \(the run's own, see its error: "
                     r"line\), not requeueing \(restart 0; srun reported (\d+)\)", text)
    assert said, text[-6000:]
    # The race this test stages: srun's status alone would have said "killed", i.e. requeue.
    assert said.group(1) != "2", f"srun reported 2: rank 1 was not killed while starting\n{text[-6000:]}"
    assert "requeueing job" not in text and f"job {job} restart 1 " not in text, text[-6000:]
    assert not (tmp_path / "logs" / f".refused-{job}").exists()


@pytest.mark.integration
def test_a_rank_that_keeps_dying_is_requeued_up_to_max_restarts(slurm, tmp_path):
    """A rank killed by SIGKILL (as the OOM killer does) while the other waits: requeued, and again until
    MAX_RESTARTS requeues are spent; then the job ends FAILED. The ranks are a stand-in PYTHON: no training."""
    body = 'echo "fake rank $SLURM_PROCID"\n[[ "$SLURM_PROCID" == 1 ]] && kill -9 $$\nexec sleep 300'
    env = job_env(slurm, DATA="unused", MODEL="tiny", INIT="", OUTPUT=str(tmp_path / "run"), MAX_RESTARTS="1",
                  PYTHON=str(fake_python(tmp_path, body)))
    job = sbatch(slurm, "stage1.sbatch", env, tmp_path, *SMALL, wait=False)
    log = log_of(tmp_path, job)
    info, text = wait_until_ended(slurm, job, log, 240), read(log)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", f"{info}\n{text[-6000:]}"
    assert re.search(rf"step failed with status \d+ and no rank refused its inputs .*: requeueing job {job} "
                     r"\(restart 1 of at most 1\)", text), text[-6000:]
    assert re.search(r"step failed with status \d+ .*; restarted 1 times already \(MAX_RESTARTS=1\): "
                     r"not requeueing", text), text[-6000:]
    assert text.count("requeueing job") == 1, text[-6000:]


@pytest.mark.integration
def test_preprocess_sbatch_equals_the_embedded_run(slurm, photos, tokenizer_dir, tmp_path):
    members = {}
    for i, (name, image) in enumerate(list(photos.items())[:4]):
        members[f"{i:06d}.png"] = encoded(image.convert("RGB"), "PNG")
        members[f"{i:06d}.txt"] = f"a photograph: {name.split('.')[0]}".encode()
    tar = write_tar(tmp_path / "photos-00000.tar", members)
    args = ["understanding", "--input", str(tar), "--tokenizer", str(tokenizer_dir), "--no-progress"]

    embedded = tmp_path / "embedded"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-m", "preprocess", *args, "--output", str(embedded), "--cpus", "2"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    out = tmp_path / "slurm"
    job = sbatch(slurm, "preprocess.sbatch", job_env(slurm, TASK="understanding", INPUT=str(tar), OUTPUT=str(out),
                                                     TOKENIZER=str(tokenizer_dir)),
                 tmp_path, "--nodes=1", "--gpus-per-node=0", "--time=30", timeout=300)
    log = read(log_of(tmp_path, job, "preprocess.sbatch"))
    assert "Ray cluster up: 1 node(s)" in log, log[-6000:]
    ours, theirs = Manifest.read(out), Manifest.read(embedded)
    assert ours.shards == theirs.shards and ours.rows_written == theirs.rows_written == 4, log[-6000:]
    assert {p.name: p.read_bytes() for p in out.glob("*.arrow")} == \
           {p.name: p.read_bytes() for p in embedded.glob("*.arrow")}
    leftover = subprocess.run(["pgrep", "-f", "--", f"--temp-dir=/tmp/ray-{job}( |$)"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", f"Ray processes left behind: {leftover.stdout}"
