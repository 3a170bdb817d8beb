import json
import subprocess
import sys


def test_packing_bench_runs_on_real_shards(shard_corpus, tmp_path):
    out = tmp_path / "packing.json"
    cmd = [sys.executable, "bench/packing.py", "--und", str(shard_corpus["understanding"]),
           "--text", str(shard_corpus["text"]), "--gen", str(shard_corpus["generation"]), "--rows", "40",
           "--json", str(out)]
    printed = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300).stdout
    results = json.loads(out.read_text())
    assert set(results) == {"stage1", "stage2", "stage3"} and "pad-to-longest" in printed
    for r in results.values():
        assert 0.5 < r["pad_to_longest"] <= 1.0 and 0.85 < r["packed"] <= 1.0
    # With short text to fill the gaps (Stage II's mixture), packing is near perfect and beats padding.
    assert results["stage2"]["packed"] > 0.99 > results["stage2"]["pad_to_longest"]
