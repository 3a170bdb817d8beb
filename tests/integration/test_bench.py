import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration  # each test runs a bench script in its own process


def test_packing_bench_runs_on_real_shards(shard_corpus, tmp_path):
    out = tmp_path / "packing.json"
    cmd = [sys.executable, "bench/packing.py", "--und", str(shard_corpus["understanding"]),
           "--text", str(shard_corpus["text"]), "--gen", str(shard_corpus["generation"]), "--micro-batches", "40",
           "--json", str(out)]
    printed = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    results = json.loads(out.read_text())
    assert set(results) == {"stage1", "stage2", "stage3"} and "pad-to-longest" in printed
    for r in results.values():
        # Flat micro-batches compute nothing but samples; padded rows compute their padding.
        assert r["flat"]["real_per_computed"] == 1.0 and r["flat"]["budget_fill"] > 0.9
        assert 0.85 < r["padded_rows"]["real_per_computed"] <= 1.0
        assert 0.4 < r["pad_to_longest"]["real_per_computed"] < 1
    # Stage I's samples here are all 580-680 tokens: 2-row budgets are filled better flat than row by row.
    assert results["stage1"]["flat"]["budget_fill"] > results["stage1"]["padded_rows"]["real_per_computed"]


def run_bench(*args: str) -> str:
    return subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, timeout=300).stdout


def test_train_step_bench_cpu_mode(tmp_path):
    out = tmp_path / "train_step.json"
    run_bench("bench/train_step.py", "--model", "tiny", "--device", "cpu", "--seq-len", "1024", "--steps", "2",
              "--json", str(out))
    results = json.loads(out.read_text())
    assert [r["checkpointing"] for r in results] == [False, True]
    for r in results:
        assert r["tokens_per_s"] > 0 and 0.5 < r["packing_efficiency"] <= 1 and r["mfu"] is None  # no peak on CPU


def test_vq_bench_cpu_mode(tmp_path):
    out = tmp_path / "vq.json"
    run_bench("bench/vq.py", "--device", "cpu", "--preset", "tiny", "--batches", "2", "--iters", "1",
              "--json", str(out))
    got = json.loads(out.read_text())
    (r,) = got["results"]
    assert r["images_per_s"] > 0 and r["ids_agree_with_fp32"] == 1.0
    assert got["chosen"]["setting"] == "fp32" and got["chosen"]["actors_per_gpu"] == 1  # the CPU forward dominates


def test_preprocess_bench_matches_the_reference(tmp_path):
    out = tmp_path / "preprocess.json"
    run_bench("bench/preprocess.py", "--repeat", "1", "--json", str(out))
    results = json.loads(out.read_text())
    und = [r for r in results if r["path"] == "understanding"]
    assert len(und) == 2 and all(r["min_psnr_db"] >= 45 and r["ratio"] > 0 for r in und)


def test_loader_bench(shard_corpus, tokenizer_dir, tmp_path):
    out = tmp_path / "loader.json"
    run_bench("bench/loader.py", "--tokenizer", str(tokenizer_dir), "--und", str(shard_corpus["understanding"]),
              "--text", str(shard_corpus["text"]), "--gen", str(shard_corpus["generation"]), "--batches", "3",
              "--json", str(out))
    assert all(r["tokens_per_s"] > 0 for r in json.loads(out.read_text()).values())


def test_preprocess_job_bench_checks_the_real_job(tmp_path):
    """Two tiny tars of web photos: the job's output checked (reruns byte-identical, stored pixels exact, one tar
    alone the same bytes) inside the bench, which exits non-zero otherwise; and the storage table."""
    out = tmp_path / "preprocess_job.json"
    run_bench("-m", "bench.preprocess_job", "--corpus", "web", "--tars", "2", "--web-per-tar", "3", "--repeat", "1",
              "--gen-rows", "2", "--vq-batch", "2", "--vq-preset", "tiny", "--json", str(out))
    results = json.loads(out.read_text())
    generation = results["jobs"][0]["generation_stage_ms_per_row"]  # the VQ path's split, through the job's code
    assert set(generation) == {"read", "decode+transform", "vq", "tokenise", "write"}
    assert all(ms > 0 for ms in generation.values())
    (job,) = results["jobs"]
    assert job["rows"] == job["images_checked"] == 6 and job["floor_rows_per_s_per_core"] > 0
    assert all(rate > 0 for rate in (job["job_rows_per_s_per_core"]["execution"], job["one_tar_rows_per_s_per_core"]))
    storage = {r["option"]: r for r in results["storage"]}
    assert all(r["exact"] for name, r in storage.items() if "lossy" not in name)
    assert not storage["jpeg q98 4:4:4 (lossy)"]["exact"]
    # The stored default stays within ~25% of the bytes of the slow default it replaced.
    assert storage["webp lossless m0 (default)"]["bytes"] <= 1.25 * storage["webp lossless m4"]["bytes"]
