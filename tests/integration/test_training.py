"""Three-stage training on 2 CPU ranks (DS_ACCELERATOR=cpu, gloo), tiny model, real shards.

Tests that start processes or take long here; the in-process ones are in tests/unit/test_training.py.
"""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.stages import STAGES, part_of
from pipeline.checkpoint import COMPLETE, latest_checkpoint
from tests.support import REPO, Ranks, consolidated, losses, rank_script, run_ranks, stage_args, tensors

LAUNCHER = str(Path(REPO) / "launchers" / "stage{}.py")


@pytest.mark.integration
def test_stage1_learns_trains_only_its_parts_and_counts_coverage(shard_corpus, tokenizer_dir, init_checkpoint,
                                                                 tmp_path):
    """Stage I for 2 epochs (~60 steps) on 2 ranks. The hand-off from stage to stage (each starting from the previous
    stage's run directory, training exactly its own parts) is checked on the demo's three runs
    (tests/integration/test_demo.py)."""
    from pipeline.config import resolve

    run = tmp_path / "stage1"
    launch = stage_args(1, shard_corpus, tokenizer_dir, run, init_checkpoint, "--epochs", "2",
                        "--learning-rate", "3e-3", "--warmup-steps", "5")
    config, args = resolve(1, launch[1:])
    steps = config.optim.train_steps  # derived from the manifests: 2 x the epoch's steps, rounded up
    assert steps == math.ceil(2 * args.epoch.steps) and 40 <= steps <= 80, (steps, args.epoch)
    out = run_ranks(launch, timeout=600)[0]
    curve = losses(run)
    assert sorted(curve) == list(range(1, steps + 1))  # exactly the derived steps, and saved at the last
    assert latest_checkpoint(run).name == f"step-{steps:08d}"
    # Said at the start, and the epoch in every step line.
    assert f"1 epoch = {math.ceil(args.epoch.steps)} steps" in out, out[:3000]
    step_lines = re.findall(r"^step +\d+ / \d+ .*$", out, re.M)
    assert len(step_lines) == steps and all(" epoch " in line for line in step_lines), step_lines[:3]
    assert f"step {steps:7d} / {steps}  epoch {steps / args.epoch.steps:.2f}  " in out  # 2, the last step rounded up
    # Coverage (issue 30): min-max inclusions per task at log steps, and a summary beside the checkpoint, of the
    # counts summed over both ranks.
    assert re.search(r"^cover (und|text|gen) \d+-\d+", out, re.M), out[-3000:]
    coverage = json.loads((latest_checkpoint(run) / "coverage.json").read_text())
    assert coverage and all(0 <= c["min"] <= c["median"] <= c["max"] and c["samples"] > 0 and c["least_seen"]
                            for c in coverage.values()), coverage
    assert sum(c["median"] * c["samples"] for c in coverage.values()) > 0  # the steps were counted
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(steps - 4, steps + 1)) / 5
    assert last < first - 0.05, (first, last)
    # Only Stage I's parts moved (the LLM, SigLIP, the LM head and the VQ stayed frozen).
    before, after = tensors(init_checkpoint), consolidated(run)
    assert set(after) == set(before)
    changed = {part_of(k) for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(STAGES[1].trainable)


@pytest.mark.integration
def test_two_ranks_two_micro_batches_equal_one_process_one_batch(shard_corpus, tokenizer_dir, init_checkpoint,
                                                                 tmp_path):
    """The 2-rank run's first step is a non-finite one (NaN images), which must be skipped whole (Adam's moments and
    step count untouched): so its second step equals the one process's first. One launch checks both, the split of
    the step over ranks and micro-batches, and the skip: either wrong, and the weights differ."""
    from safetensors.torch import load_file

    def step(world: int, rows_per_micro_batch: int, poison_first: bool = False) -> dict[str, torch.Tensor]:
        out = tmp_path / f"params-{world}-{poison_first}.safetensors"
        flags = ["--model", "tiny", "--tokenizer", str(tokenizer_dir), "--init", str(init_checkpoint),
                 "--data", *[str(shard_corpus[t]) for t in ("understanding", "text", "generation")],
                 "--seq-len", "1400", "--rows-per-step", "4", "--rows-per-micro-batch", str(rows_per_micro_batch),
                 "--grad-clip", "0", "--warmup-steps", "0", "--learning-rate", "10", "--adam-eps", "1000",
                 "--output", str(tmp_path / f"run-{world}-{poison_first}")]
        run_ranks(rank_script("train_step_equivalence.py", {"flags": flags, "out": str(out),
                                                            "poison_first": poison_first}),
                  world_size=world, timeout=300)
        return load_file(str(out))

    # With eps 1000 Adam's first update is ~lr * g / eps: linear in the gradient, so a wrong normalisation shows.
    whole, after_skip = step(1, 4), step(2, 1, poison_first=True)
    before = tensors(init_checkpoint)
    moved = max((whole[k] - before[k]).abs().max().item() for k in whole)
    assert moved > 1e-4
    for name in whole:
        torch.testing.assert_close(after_skip[name], whole[name], atol=1e-6, rtol=0, msg=name)


@pytest.mark.integration
def test_dry_run_estimates_and_refuses(tmp_path):
    ok = subprocess.run([sys.executable, LAUNCHER.format(2), "--dry-run", "--model", "7b", "--world-size", "256"],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "2 micro-batch(es) of 1 row(s)" in ok.stdout and "GiB" in ok.stdout and "DeepSpeed" in ok.stdout
    refused = subprocess.run([sys.executable, LAUNCHER.format(3), "--dry-run", "--model", "7b", "--world-size",
                              "256"], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "128 rows per step cannot feed 256" in refused.stderr and "1, 2, 4, 8, 16" in refused.stderr


def resumable_stage2(corpus, tokenizer_dir, init, output: Path, steps: int, *extra: str) -> list[str]:
    """A Stage II run checkpointing every 2 steps, guidance dropout on (the random draws a resume must continue)."""
    return stage_args(2, corpus, tokenizer_dir, output, init, "--train-steps", str(steps), "--save-every", "2",
                      "--guidance-dropout", "0.5", *extra)


@pytest.fixture(scope="module")
def uninterrupted(shard_corpus, tokenizer_dir, init_checkpoint, tmp_path_factory) -> dict[int, float]:
    """The losses of 8 uninterrupted steps, which every run resumed on the way there must give again (one run for the
    module's resume tests: how many checkpoints a run keeps changes no loss)."""
    output = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_ranks(resumable_stage2(shard_corpus, tokenizer_dir, init_checkpoint, output, 8), timeout=600)
    return losses(output)


@pytest.mark.integration
def test_kill_9_then_resume_gives_the_uninterrupted_losses(shard_corpus, tokenizer_dir, init_checkpoint,
                                                          uninterrupted, tmp_path):
    def args(output: Path) -> list[str]:
        return resumable_stage2(shard_corpus, tokenizer_dir, init_checkpoint, output, 8, "--keep-last", "2")

    reference = uninterrupted

    broken = tmp_path / "broken"
    ranks = Ranks(args(broken))
    ranks.wait_for(0, "step       5", timeout=600)
    ranks.procs[1].send_signal(signal.SIGKILL)  # one rank dies mid-run; the launcher takes the rest down
    ranks.kill()
    latest = latest_checkpoint(broken)
    assert latest is not None and latest.name == "step-00000004"
    # A newer checkpoint torn by the crash (rank 1's shard and the COMPLETE mark missing) is never resumed from.
    torn = latest.with_name("step-00000006")
    shutil.copytree(latest, torn)
    (torn / COMPLETE).unlink()
    for f in torn.glob("*rank_01*"):
        f.unlink()
    assert latest_checkpoint(broken) == latest

    outputs = run_ranks(args(broken), timeout=600)
    assert f"resumed from {latest} at step 4" in outputs[0]
    resumed = losses(broken)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    assert (torn / COMPLETE).exists() and len(list(torn.glob("rank-*.pt"))) == 2  # re-saved whole this time


@pytest.mark.integration
def test_damaged_checkpoints_are_skipped_and_a_rollback_sets_newer_ones_aside(shard_corpus, tokenizer_dir,
                                                                              init_checkpoint, uninterrupted, tmp_path):
    def args(output: Path, steps: int, *extra: str) -> list[str]:
        return resumable_stage2(shard_corpus, tokenizer_dir, init_checkpoint, output, steps, "--keep-last", "3",
                                *extra)

    reference = uninterrupted
    run = tmp_path / "run"
    run_ranks(args(run, 6), timeout=600)
    steps = {n: run / "checkpoints" / f"step-{n:08d}" for n in (2, 4, 6)}
    model_states = sorted(steps[6].glob("*model_states.pt"))[0]  # the newest: one flipped bit
    data = bytearray(model_states.read_bytes())
    data[len(data) // 2] ^= 1
    model_states.write_bytes(bytes(data))
    optimizer = sorted(steps[4].glob("*optim_states.pt"))[0]  # the one before: a truncated optimizer file
    optimizer.write_bytes(optimizer.read_bytes()[:1000])

    # Named explicitly, a damaged checkpoint stops every rank in one line before the model is built.
    for flags, expected in (
            (stage_args(3, shard_corpus, tokenizer_dir, tmp_path / "stage3", run, "--train-steps", "2"),
             f"error: --init {run}: its checkpoint step-00000006 is damaged: "),
            (args(run, 8, "--resume", str(steps[6])), f"error: --resume {steps[6]}: the checkpoint is damaged: ")):
        ranks = Ranks(flags)
        with pytest.raises(AssertionError, match="exited 2"):
            ranks.wait(timeout=300)
        assert expected in ranks.output(0) and "Traceback" not in ranks.output(0)

    outputs = run_ranks(args(run, 8), timeout=600)
    assert f"resumed from {steps[2]} at step 2" in outputs[0]
    assert f"checkpoint {steps[6]} is damaged" in outputs[0] and f"checkpoint {steps[4]} is damaged" in outputs[0]
    resumed = losses(run)
    for step in range(3, 9):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6), step
    abandoned = run / "checkpoints" / "abandoned"
    assert {p.name for p in abandoned.iterdir()} == {"step-00000004", "step-00000006"}  # kept, never deleted

    # A rollback on purpose, keeping one checkpoint: the step resumed from survives pruning, newer ones are set aside.
    run_ranks(args(run, 6, "--resume", str(steps[4]), "--keep-last", "1"), timeout=600)
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000004", "step-00000006"]
    assert (abandoned / "step-00000008").is_dir() and (abandoned / "step-00000006.1").is_dir()


@pytest.mark.integration
def test_a_damaged_shard_stops_every_rank_before_the_model_is_built(shard_corpus, tokenizer_dir, init_checkpoint,
                                                                    tmp_path):
    corpus = dict(shard_corpus)
    corpus["text"] = tmp_path / "text"
    shutil.copytree(shard_corpus["text"], corpus["text"])
    shard = sorted(corpus["text"].glob("*.arrow"))[-1]
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    ranks = Ranks(stage_args(2, corpus, tokenizer_dir, tmp_path / "run", init_checkpoint, "--train-steps", "2"))
    with pytest.raises(AssertionError, match="exited 2"):
        ranks.wait(timeout=300)
    assert f"error: 1 shard(s) do not match their manifests: {shard} does not match its sha256" in ranks.output(0)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.integration
def test_sigusr1_to_one_rank_checkpoints_both_at_the_same_step(shard_corpus, tokenizer_dir, init_checkpoint,
                                                                tmp_path):
    output = tmp_path / "run"
    ranks = Ranks(stage_args(1, shard_corpus, tokenizer_dir, output, init_checkpoint, "--train-steps", "1000",
                             "--save-every", "1000"))
    ranks.wait_for(0, "step       2", timeout=600)
    ranks.signal(1, signal.SIGUSR1)  # Slurm's pre-emption warning reaches one rank
    outputs = ranks.wait(timeout=300)  # both exit 0
    stopped = [line for line in outputs[0].splitlines() if line.startswith("stop signal")]
    assert stopped, outputs[0][-2000:]
    latest = latest_checkpoint(output)
    step = json.loads((latest / COMPLETE).read_text())["step"]
    assert f"checkpointed step {step}" in stopped[0] and 2 <= step < 1000
    assert {p.name for p in latest.glob("rank-*.pt")} == {"rank-0.pt", "rank-1.pt"}
    assert len(list(latest.glob("*rank_0[01]*optim_states.pt"))) == 2  # both ranks' ZeRO shards, same step


@pytest.mark.integration
def test_validation_tensorboard_and_sample_grid(shard_corpus, tokenizer_dir, init_checkpoint, tmp_path):
    """A 2-rank Stage II run's validation line, sample grid (PNG and TensorBoard image) and Q&A sample (TensorBoard
    text), read back with TensorBoard's own reader."""
    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator

    from pipeline.run_dir import samples_tensorboard_dir

    output = tmp_path / "run"
    outputs = run_ranks(stage_args(2, shard_corpus, tokenizer_dir, output, init_checkpoint, "--train-steps", "2",
                                   "--val-data", str(shard_corpus["text"]), str(shard_corpus["generation"]),
                                   str(shard_corpus["understanding"]), "--val-every", "2", "--val-batches", "2",
                                   "--sample-every", "2", "--sample-prompts", "a red cat", "a blue dog",
                                   "--qa-samples", "1", "--qa-max-new-tokens", "3"), timeout=600)
    with Image.open(output / "samples" / "step-00000002.png") as grid:
        assert grid.size == (2 * 384, 384)
    line = next(x for x in outputs[0].splitlines() if x.startswith("step") and " validation " in x)
    values = dict(zip(line.split()[3::2], map(float, line.split()[4::2]), strict=True))
    assert values["text"] > 0 and values["generation"] > 0 and values["understanding"] > 0
    assert list((output / "tensorboard").glob("events.out.tfevents.*"))
    samples = event_accumulator.EventAccumulator(str(samples_tensorboard_dir(output)), size_guidance={
        event_accumulator.IMAGES: 0, event_accumulator.TENSORS: 0})
    samples.Reload()
    grids = [tag for tag in samples.Tags()["images"] if samples.Images(tag)[0].step == 2]
    answers = [e.tensor_proto.string_val[0].decode() for tag in samples.Tags()["tensors"] if tag.startswith("qa/")
               for e in samples.Tensors(tag) if e.step == 2]
    assert grids and answers, samples.Tags()
    record = json.loads((output / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["too_long"] == {"understanding": 0, "text": 0, "generation": 0}  # summed over ranks, per task
    # Flat micro-batches: every computed token is a sample's; the token budget (rows x seq-len) is nearly filled.
    assert record["packing_efficiency"] == 1.0 and 0.8 < record["budget_fill"] <= 1.0
    assert (output / "config.yaml").is_file() and (output / "ds_config.json").is_file()


@pytest.mark.integration
def test_nonfinite_steps_are_skipped_then_stop_the_run(shard_corpus, tokenizer_dir, init_checkpoint, tmp_path):
    from safetensors.torch import save_file

    poisoned = tmp_path / "poisoned"  # a NaN in the generation head: every step's loss is NaN
    state = tensors(init_checkpoint)
    state["model.generation_head.vision_head.bias"][0] = float("nan")
    poisoned.mkdir()
    save_file(state, str(poisoned / "model.safetensors"))
    ranks = Ranks(stage_args(2, shard_corpus, tokenizer_dir, tmp_path / "run", poisoned, "--train-steps", "20",
                             "--max-nonfinite-steps", "2"))
    with pytest.raises(AssertionError, match="exited 2(.|\n)*non-finite steps in a row"):  # 2: not requeued
        ranks.wait(timeout=600)
    assert "SKIPPED (non-finite)" in ranks.output(0)


@pytest.mark.integration
def test_a_task_whose_samples_never_fit_stops_the_run_with_exit_2(shard_corpus, tokenizer_dir, init_checkpoint,
                                                                  tmp_path):
    """Found mid-run, fixed only by a person (--seq-len or --ratio): exit 2, which Slurm's scripts never requeue."""
    args = stage_args(2, shard_corpus, tokenizer_dir, tmp_path / "run", init_checkpoint, "--ratio", "0", "0", "1",
                      "--seq-len", "500", "--max-too-long-in-a-row", "4", tasks=["generation"])
    with pytest.raises(AssertionError, match=r"exited 2(.|\n)*error: generation: the last 4 samples drawn were all "
                                             r"longer than --seq-len 500"):
        run_ranks(args, world_size=1, timeout=600)
