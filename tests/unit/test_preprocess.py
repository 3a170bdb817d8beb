"""preprocess/: real Ray (one `ray start --head` per session, token auth on), real tars, real photographs.

Ray job runs (kept few, the machine has 2 cores): understanding on two tars (photos + a bad-input corpus),
generation on an ImageNet-style folder, text on JSONL, understanding on LLaVA JSON, a killed run and its
resume, two runs whose output is rejected, a run that loses a Ray worker (and its undisturbed twin) and one
embedded Ray started and probed. `ray job submit` runs in tests/integration/test_preprocess_inputs.py, on every kind of
bad input at once.

In-process tests here; the ones that start processes or take long are in tests/integration/test_preprocess.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from model.manifest import Manifest, ShardEntry
from preprocess.cli import main
from preprocess.job import EXIT_USAGE, UsageError, check_output_path, rejection
from tests.support import REPO


def test_a_worker_imports_no_vq_code_until_it_runs_the_vq():
    """Every Ray worker of a job imports preprocess.job (its task functions live there) before its first row: the
    VQ's modules (transformers' modelling code, ~40% of that import) only where a VQ actor needs them."""
    code = ("import sys, preprocess.job\n"
            "print([m for m in ('model.vq', 'model.config', 'transformers.models.janus.modeling_janus')"
            " if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_relative_output_is_refused_inside_a_ray_job(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert check_output_path("out") == tmp_path / "out"  # outside a job: resolved against the cwd
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    with pytest.raises(ValueError, match="relative"):
        check_output_path("out")
    assert check_output_path(str(tmp_path / "abs")) == tmp_path / "abs"


def test_either_spelling_of_a_vq_dtype_is_recorded_as_one_name():
    from preprocess.cli import config_from_args, parser

    for spelling in ("bf16", "bfloat16"):  # the one precision table of every command line (model/config.py)
        args = parser().parse_args(["generation", "--input", "in.tar", "--output", "out", "--tokenizer", "tok",
                                    "--vq-dtype", spelling])
        assert config_from_args(args).vq_dtype == "bfloat16"  # what the manifest and the resume guard hold


def test_rejection_rule():
    def manifest(rows_in: int, written: int) -> Manifest:
        return Manifest(task="understanding", tokenizer_fingerprint="t", rows_in=rows_in, rows_written=written,
                        skipped={"image_corrupt": rows_in - written} if rows_in > written else {})

    assert rejection(manifest(10, 5), 0.5) is None  # exactly the fraction passes
    assert "6 of 10 rows skipped (60%)" in rejection(manifest(10, 4), 0.5)
    assert rejection(manifest(10, 4), 1.0) is None
    assert rejection(manifest(10, 10), 0.0) is None
    for rows_in in (0, 3):  # nothing written fails whatever the fraction allows
        assert "no row was written" in rejection(manifest(rows_in, 0), 1.0)
    unreadable = manifest(10, 10)  # 3 of 4 input tars could not be opened: their rows are not even counted
    unreadable.shards = [ShardEntry(file=f"{i}.arrow", rows=10 if i == 0 else 0, sha256="") for i in range(4)]
    unreadable.files_failed = [{"source": f"{i}.tar", "reason": "ReadError: empty file"} for i in range(1, 4)]
    assert "3 of 4 input shards could not be read" in rejection(unreadable, 0.5)
    assert rejection(unreadable, 0.75) is None


def test_readme_lists_every_skip_reason():
    from preprocess.records import SKIP_REASONS

    section = (REPO / "README.md").read_text().split("## Preprocessing")[1].split("\n## ")[0]
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("| `")}
    assert listed == set(SKIP_REASONS)


def test_every_flag_has_help_and_the_task_list_names_only_real_flags_and_every_format():
    """ArgumentDefaultsHelpFormatter shows a flag's default only where the flag has help; a flag or format renamed
    in the parser but not in TASK_INPUTS would leave --help naming one that does not exist."""
    from preprocess.cli import TASK_INPUTS, parser
    from preprocess.sources import FORMATS

    p = parser()
    undocumented = [a.option_strings or a.dest for a in p._actions if not a.help]
    assert undocumented == []
    flags = {flag for a in p._actions for flag in a.option_strings}
    assert {flag for _, named, _ in TASK_INPUTS.values() for flag in named} <= flags
    assert sorted({fmt for formats, _, _ in TASK_INPUTS.values() for fmt in formats}) == sorted(FORMATS)
    assert set(TASK_INPUTS) == set(p._actions[1].choices)
    for task in (None, *TASK_INPUTS):
        parser(task).format_help()  # argparse formats help with %: a bare % in any help text raises here


@pytest.mark.parametrize("task", ["understanding", "generation", "text"])
def test_task_help_names_its_input_formats_and_flags(task, capsys):
    from preprocess.cli import TASK_INPUTS

    with pytest.raises(SystemExit) as exited:
        main([task, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    epilog = " ".join(out.split("per task")[1].split())  # unwrapped
    formats, flags, _ = TASK_INPUTS[task]
    assert f"{task}:" in epilog and f"input formats: {', '.join(formats)}" in epilog
    assert f"its flags: {' '.join(flags)}" in epilog
    assert [other for other in TASK_INPUTS if f"{other}:" in epilog] == [task]  # that task's alone
    assert "--context CONTEXT" in out and "(default: 4096)" in out  # every flag's help stays above it
    with pytest.raises(SystemExit):
        main(["--help"])
    whole = capsys.readouterr().out.split("per task")[1]
    assert all(f"{name}:" in whole for name in TASK_INPUTS)


def test_usage_mistakes_exit_2_in_one_line(tokenizer_dir, tmp_path, capsys):
    """Found before any work (no Ray is started): one `error: --flag` line and exit 2."""
    tok = ["--tokenizer", str(tokenizer_dir)]
    cases = {
        "--max-skip-fraction": ["--max-skip-fraction", "1.5", "--input", "in.tar", *tok],
        "--instructions": ["--input", "in.tar", "--instructions", str(tmp_path / "missing.txt"), *tok],
        "--tokenizer": ["--input", "in.tar", "--tokenizer", str(tmp_path / "no-tokenizer")],
        "--input": ["--input", str(tmp_path / "nothing-*.tar"), *tok],
    }
    for flag, args in cases.items():
        with pytest.raises(SystemExit) as exited:
            main(["understanding", *args, "--output", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exited.value.code == EXIT_USAGE and err.startswith(f"error: {flag}") and err.count("\n") == 1, err


@pytest.mark.parametrize(("flag", "value", "least"), [("--vq-batch-size", "0", 1), ("--vq-actors-per-gpu", "0", 1),
                                                     ("--shard-size", "0", 1), ("--vq-actors", "-2", 0),
                                                     ("--task-tries", "0", 1), ("--progress-every", "-1", 0),
                                                     ("--progress-every", "nan", 0)])
def test_counts_below_their_least_are_refused_at_once(flag, value, least):
    from preprocess.cli import config_from_args, parser

    args = parser().parse_args(["generation", "--input", "in.tar", "--output", "out", "--tokenizer", "tok", flag,
                                value])
    with pytest.raises(UsageError, match=f"{flag} must be >= {least}"):
        config_from_args(args)


def test_vq_kernel_choices_are_in_the_settings_only_when_not_the_default():
    """A resume with another VQ batch shape or memory format could mix ids at near-ties: the settings hash guards
    it, while outputs written before these flags existed keep their hash."""
    from preprocess.cli import config_from_args, parser
    from preprocess.job import job_settings

    def settings(*flags: str) -> dict:
        args = parser().parse_args(["generation", "--input", "in.tar", "--output", "out", "--tokenizer", "tok",
                                    *flags])
        return job_settings(config_from_args(args), [], "tok", "vq")

    default = settings()
    assert "vq_batch_size" not in default and "vq_channels_last" not in default
    assert settings("--vq-batch-size", "16") == default
    assert settings("--vq-batch-size", "8")["vq_batch_size"] == 8
    assert settings("--vq-channels-last")["vq_channels_last"] is True


def test_an_output_directory_of_another_dataset_is_refused_untouched(tokenizer_dir, tmp_path, jpeg, capsys,
                                                                       monkeypatch):
    """Issue #27, defect 4. Before: understanding into a text output directory replaced its manifest, orphaned its
    shards (exit 0), and deleted temporary-looking files of a folder it had not made. Now each of these exits 2
    before Ray starts, and every file in the directory is as it was."""
    import json

    import preprocess.job as job
    from tests.support import samples, write_tar

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray started: the output directory was adopted")

    monkeypatch.setattr(job, "ray_connection", no_ray)
    tar = write_tar(tmp_path / "in.tar", samples(["k0"], jpeg))
    text = tmp_path / "text"  # a text dataset: its manifest and a shard
    text.mkdir()
    Manifest(task="text", tokenizer_fingerprint="t", settings={"convert": {"task": "text"}},
             shards=[ShardEntry(file="docs-0.arrow", rows=0, sha256="")]).write(text)
    (text / "docs-0.arrow").write_bytes(b"rows")
    other = tmp_path / "other-settings"  # an understanding output of other settings, killed mid-run
    (other / ".progress").mkdir(parents=True)
    (other / ".progress" / "job.json").write_text(json.dumps({"task": "understanding", "settings_hash": "x"}))
    (other / ".in-abc.arrow.tmp-7").write_bytes(b"half")
    unreadable = tmp_path / "unreadable"  # an owner file cut short
    (unreadable / ".progress").mkdir(parents=True)
    (unreadable / ".progress" / "job.json").write_text('{"task": "underst')
    foreign = tmp_path / "foreign"  # not a preprocess output at all
    foreign.mkdir()
    (foreign / ".notes.tmp-1").write_bytes(b"someone's")
    (tmp_path / "a-file").write_bytes(b"x")
    (tmp_path / "a-link").symlink_to(tmp_path / "foreign")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path}
    for out, says in ((text, "a text job"), (other, "other settings"), (unreadable, "unreadable"),
                      (foreign, "not a preprocess output"),
                      (tmp_path / "a-file", "not a directory"), (tmp_path / "a-link", "not a preprocess output")):
        with pytest.raises(SystemExit) as exited:
            main(["understanding", "--input", str(tar), "--output", str(out), "--tokenizer", str(tokenizer_dir)])
        err = capsys.readouterr().err
        assert exited.value.code == EXIT_USAGE and err.startswith("error: --output") and says in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.parent != tmp_path} == before
