"""Faults during a save, on 2 CPU ranks with real DeepSpeed: kill -9 while a checkpoint is being written, and a full
disk (bytes, and inodes) under a save. Each time `--resume auto` continues from the newest intact checkpoint and the
losses equal an uninterrupted run's (a flipped byte and a truncated optimizer file:
tests/integration/test_training.py)."""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import COMPLETE, latest_checkpoint
from tests.support import Ranks, losses, run_ranks, stage_args

STEPS = 6


def args(corpus, tokenizer_dir, init, output: Path) -> list[str]:
    """A collective timeout well inside the tests' waits: a rank left waiting for another fails, with its stack,
    instead of outlasting the test (the default, 1500 s, would)."""
    return stage_args(2, corpus, tokenizer_dir, output, init, "--train-steps", str(STEPS), "--save-every", "2",
                      "--keep-last", "2", "--guidance-dropout", "0.5", "--collective-timeout-seconds", "120")


@pytest.fixture(scope="module")
def straight(shard_corpus, tokenizer_dir, init_checkpoint, tmp_path_factory) -> Path:
    """The uninterrupted run every faulty one is held against."""
    output = tmp_path_factory.mktemp("straight") / "run"
    run_ranks(args(shard_corpus, tokenizer_dir, init_checkpoint, output), timeout=600)
    return output


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def resumed_as_straight(run: Path, straight: Path, outputs: list[str], start: int) -> None:
    """The resumed run started at `start` and from there on has the uninterrupted run's losses."""
    assert f"resumed from {step_dir(run, start)} at step {start}" in outputs[0], outputs[0][-3000:]
    resumed, reference = losses(run), losses(straight)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(start + 1, STEPS + 1):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    assert latest_checkpoint(run) == step_dir(run, STEPS)


def stopped_mid_save(ranks: Ranks, run: Path, steps: list[int]) -> Path:
    """The step directory of a save caught in the act: once one of its files exists, every rank is stopped (SIGSTOP)
    and, if its COMPLETE is still missing, left stopped; a save that finished first is let go, and the next tried."""
    for step in steps:
        path = step_dir(run, step)
        for _ in range(60_000):  # 10 minutes at most
            if any(path.glob("*.pt")) or any(p.poll() is not None for p in ranks.procs):
                break
            time.sleep(0.01)
        for p in ranks.procs:
            p.send_signal(signal.SIGSTOP)
        if any(path.glob("*.pt")) and not (path / COMPLETE).exists():
            return path
        for p in ranks.procs:
            p.send_signal(signal.SIGCONT)
    raise AssertionError(f"no save caught before its COMPLETE at steps {steps}:\n{ranks.output(0)[-3000:]}")


@pytest.mark.integration
def test_kill_9_during_a_save_resumes_from_the_checkpoint_before(shard_corpus, tokenizer_dir, init_checkpoint,
                                                                 straight, tmp_path):
    run = tmp_path / "run"
    ranks = Ranks(args(shard_corpus, tokenizer_dir, init_checkpoint, run))
    try:
        torn = stopped_mid_save(ranks, run, [4, 6])
    finally:
        ranks.kill()  # SIGKILL, every rank at once: a node lost mid-save
    step = int(torn.name.split("-")[1])
    assert not (torn / COMPLETE).exists() and latest_checkpoint(run) == step_dir(run, step - 2)

    outputs = run_ranks(args(shard_corpus, tokenizer_dir, init_checkpoint, run), timeout=600)
    resumed_as_straight(run, straight, outputs, step - 2)
    assert (step_dir(run, step) / COMPLETE).exists()  # written whole this time


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes in 4 KiB pages, inodes) a directory tree takes on a tmpfs, itself included."""
    entries = [path, *path.rglob("*")]
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in entries if p.is_file()), len(entries)


@pytest.fixture
def small_disk(tmp_path):
    """mount(OPTIONS): a tmpfs at tmp_path/disk with those limits, remountable with others; unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()

    def mount(options: str, remount: bool = False) -> Path:
        flags = ["-o", f"remount,{options}"] if remount else ["-t", "tmpfs", "-o", options, "tmpfs"]
        done = subprocess.run(["mount", *flags, str(disk)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {done.stderr.strip()}")
        return disk

    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a size-limited file system needs root to mount a tmpfs")
    yield mount
    if os.path.ismount(disk):
        subprocess.run(["umount", "-l", str(disk)], check=True)


@pytest.mark.integration
@pytest.mark.parametrize("full", ["bytes", "inodes"])
def test_a_full_disk_during_a_save_fails_clearly_then_resumes(shard_corpus, tokenizer_dir, init_checkpoint,
                                                              straight, small_disk, full):
    """bytes: the disk fills while both ranks write DeepSpeed's shards (torch.save then says only "iostream error").
    inodes: the disk fills exactly at rank 0's COMPLETE, while rank 1 waits for it in a collective."""
    checkpoint_bytes, checkpoint_inodes = tree_size(step_dir(straight, STEPS))
    rest_bytes, rest_inodes = tree_size(straight)
    rest_bytes -= 2 * checkpoint_bytes  # keep-last 2: two checkpoints in there
    rest_inodes -= 2 * checkpoint_inodes
    if full == "bytes":  # the first checkpoint fits, the second runs out half-way
        limit = f"size={rest_bytes + checkpoint_bytes * 3 // 2},nr_inodes=1000"
    else:  # the mount's root, the run without checkpoints, the first checkpoint, the second but its COMPLETE
        limit = f"size={rest_bytes + 4 * checkpoint_bytes},nr_inodes={1 + rest_inodes + 2 * checkpoint_inodes - 1}"
    run = small_disk(limit) / "run"

    ranks = Ranks(args(shard_corpus, tokenizer_dir, init_checkpoint, run))
    with pytest.raises(AssertionError, match="exited 2"):
        ranks.wait(timeout=600)  # bounded: a rank left in a collective would stop it here
    for rank in (0, 1):  # every rank says why, not only the one whose write failed
        said = re.search(rf"checkpoint {step_dir(run, 4)} was not written \(([\d,]+) bytes and ([\d,]+) inodes free "
                         r"on its file system; its partial files were removed\): (.*)", ranks.output(rank))
        assert said, ranks.output(rank)[-3000:]
        free_bytes, free_inodes, failures = int(said[1].replace(",", "")), int(said[2].replace(",", "")), said[3]
        if full == "bytes":
            assert free_bytes < checkpoint_bytes // 2 and "rank " in failures
        else:
            assert free_inodes == 0 and "rank 1" not in failures
            assert failures.startswith("rank 0: OSError: [Errno 28] No space left on device")
    assert latest_checkpoint(run) == step_dir(run, 2)
    assert not step_dir(run, 4).exists()  # its partial files removed: they held the space the user needs back

    small_disk(f"size={rest_bytes + 4 * checkpoint_bytes},nr_inodes=1000", remount=True)  # space freed
    outputs = run_ranks(args(shard_corpus, tokenizer_dir, init_checkpoint, run), timeout=600)
    resumed_as_straight(run, straight, outputs, 2)



@pytest.mark.integration
def test_a_save_that_fails_on_one_rank_only_fails_on_both_at_once(shard_corpus, tokenizer_dir, init_checkpoint,
                                                                  tmp_path):
    """Rank 0's model-states file cannot be written (a directory stands in its way) while rank 1's is: DeepSpeed's
    save goes on with collectives (ZeRO-3's epilogue all-gather, a barrier) that rank 0's raise skipped, so rank 0
    runs them too and both stop with the same error, within a collective timeout set far above the wait allowed."""
    run = tmp_path / "run"
    ranks = Ranks(stage_args(2, shard_corpus, tokenizer_dir, run, init_checkpoint, "--train-steps", "4",
                             "--save-every", "4", "--collective-timeout-seconds", "1000"))
    ranks.wait_for(0, "step       1", timeout=300)  # after start-up set aside every step directory it found
    (step_dir(run, 4) / "zero_pp_rank_0_mp_rank_00_model_states.pt").mkdir(parents=True)
    with pytest.raises(AssertionError, match="exited 2"):
        ranks.wait(timeout=240)
    for rank in (0, 1):
        assert re.search(rf"checkpoint {step_dir(run, 4)} was not written .*\): rank 0: [^;]*$",
                         ranks.output(rank), re.M), ranks.output(rank)[-3000:]
