"""Tests that start processes or take long here; the in-process ones are in tests/unit/test_data_path.py."""

import json
import subprocess
import sys

import pytest

from tests.support import make_config

RESUME_SCRIPT = r"""
import json, sys, torch
from model.tokenizer import SpecialTokens, load_tokenizer
from pipeline.config import DataConfig
from pipeline.data import DataPipeline
args = json.loads(sys.argv[1])
cfg = DataConfig(**args["config"])
pipe = DataPipeline(cfg, SpecialTokens.from_tokenizer(load_tokenizer(args["tokenizer"])))
if args["state"]:
    pipe.load_state_dict(json.load(open(args["state"])))
digests = []
for i, batch in zip(range(args["take"]), pipe):
    digests.append([batch.input_ids.tolist(), batch.gen_input_ids.tolist(), batch.pixel_values.sum().item()])
    if i + 1 == args["save_after"]:
        json.dump(pipe.state_dict(), open(args["save_to"], "w"))
json.dump(digests, open(args["out"], "w"))
"""


@pytest.mark.integration
def test_resume_in_a_new_process_continues_exactly(shard_corpus, tokenizer_dir, tmp_path):
    from dataclasses import asdict

    config = asdict(make_config(shard_corpus, guidance_dropout=0.3, buffer_size=8))

    def run(take, state=None, save_after=-1):
        out = tmp_path / f"out-{take}-{save_after}.json"
        args = dict(config=config, tokenizer=str(tokenizer_dir), state=state, take=take, save_after=save_after,
                    save_to=str(tmp_path / "state.json"), out=str(out))
        subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(args)], check=True, timeout=300)
        return json.loads(out.read_text())

    full = run(take=12, save_after=5)  # the pipeline has prefetched beyond batch 5 when the state is taken
    resumed = run(take=7, state=str(tmp_path / "state.json"))
    assert resumed == full[5:]
    assert full[5] != full[4]
