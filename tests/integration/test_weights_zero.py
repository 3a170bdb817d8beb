"""Issue 3: an original-layout checkpoint loaded under deepspeed.zero.Init on 2 CPU ranks (gloo) gives the same
gathered weights as the unsharded load, with each rank holding only its shard; a ZeRO-3 save is lossless.
The ranks run tests/ranks/zero3_load_weights.py."""

from __future__ import annotations

import pytest
from safetensors.torch import save_file

from model.weights import load_model
from tests.support import rank_script, run_ranks

pytestmark = pytest.mark.integration

ASIDE = "aside/"  # prefix of the kept-aside tensors inside the reference file
TIMEOUT_S = 150


def test_zero_init_load_equals_unsharded(original_checkpoint, tmp_path):
    model, aside = load_model(original_checkpoint)  # the unsharded load is the reference
    reference = {n: p.detach().clone() for n, p in model.named_parameters()}
    reference.update({ASIDE + k: v for k, v in aside.items()})
    save_file(reference, str(tmp_path / "reference.safetensors"))
    args = {"checkpoint": str(original_checkpoint), "reference": str(tmp_path / "reference.safetensors"),
            "out": str(tmp_path / "out"), "aside_prefix": ASIDE}
    outputs = run_ranks(rank_script("zero3_load_weights.py", args), world_size=2, timeout=TIMEOUT_S)
    for rank, out in enumerate(outputs):
        assert f"rank {rank}: {len(model.state_dict())} gathered equal" in out, out[-4000:]
    assert "rank 0: zero-3 original save lossless" in outputs[0], outputs[0][-4000:]
