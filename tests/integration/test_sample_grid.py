"""Issue 18: a sample grid under ZeRO-3 gathers the generation modules once, not every layer for every one of
the 576 tokens, and its ids are the ones per-call gathers give (its fallback, where the modules do not fit a rank
whole: ZeRO-3's own way, a module's weights gathered at each call). 2 CPU ranks run tests/ranks/zero3_sample_grid.py;
the all-gathers are counted where they reach torch.distributed."""

from __future__ import annotations

import json

import pytest

from tests.support import rank_script, run_ranks

pytestmark = pytest.mark.integration

TOKENS = 576  # image tokens per grid image: per-call gathers happen at least once per token


def grids(outputs: list[str]) -> list[dict[str, dict]]:
    """Per rank: each way's printed record."""
    return [{r["way"]: r for r in map(json.loads, filter(lambda line: line.startswith("{"), out.splitlines()))}
            for out in outputs]


def test_zero3_sample_grid_gathers_once_with_the_per_call_ids(tokenizer_dir):
    args = {"tokenizer": str(tokenizer_dir), "prompts": ["a red cube on a table", "a cat"]}
    outputs = run_ranks(rank_script("zero3_sample_grid.py", args), timeout=300)
    for rank, ways in enumerate(grids(outputs)):
        once, fallback = ways["once"], ways["fallback"]
        assert fallback["gathers"] >= TOKENS, fallback["gathers"]  # the counter sees the per-call gathers
        # One gather per parameter at most, however many tokens: the bound does not grow with the grid.
        assert 0 < once["gathers"] <= once["params"], (rank, once["gathers"], once["params"])
        assert once["ids"] == fallback["ids"], rank
    assert grids(outputs)[0]["once"]["ids"] == grids(outputs)[1]["once"]["ids"]
