"""bench/vq.py compares settings on the same images (issue 25, 5): two identical settings agree on every id."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from tests.support import REPO

spec = importlib.util.spec_from_file_location("bench_vq", Path(REPO) / "bench" / "vq.py")
vq_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vq_bench)


def test_the_bench_run_with_two_identical_settings_reports_full_agreement(monkeypatch, tmp_path):
    """Through the CLI as `make test` runs it, with the CPU's one setting given twice."""
    fp32 = vq_bench.settings("cpu")[0]
    monkeypatch.setattr(vq_bench, "settings", lambda device: [fp32, {**fp32, "name": "fp32 again"}])
    out = tmp_path / "vq.json"
    monkeypatch.setattr(sys, "argv", ["vq.py", "--device", "cpu", "--preset", "tiny", "--batches", "2", "3",
                                      "--iters", "1", "--json", str(out)])
    vq_bench.main()
    results = json.loads(out.read_text())["results"]
    assert len(results) == 4
    assert {r["setting"]: r["ids_agree_with_fp32"] for r in results if r["batch"] == 3} == {"fp32": 1.0,
                                                                                          "fp32 again": 1.0}
    assert all(r["ids_agree_with_fp32"] == 1.0 for r in results)


def test_the_images_are_drawn_once_and_agreement_compares_position_by_position():
    assert vq_bench.images([2, 3]) == vq_bench.images([2, 3])  # the same images for every setting of a run
    first = vq_bench.images([2])[2]
    assert len(set(first)) == 2 and all(len(row) == vq_bench.SIZE * vq_bench.SIZE * 3 for row in first)
    ids = torch.arange(12).view(2, 6)
    assert vq_bench.agreement(ids, ids.clone()) == 1.0
    assert vq_bench.agreement(ids, ids.flip(0)) == 0.0  # the same ids for other images do not count
    with pytest.raises(ValueError, match="not the same images"):
        vq_bench.agreement(ids, ids[:1])
