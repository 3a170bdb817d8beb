"""`python -m model.generate` end to end on a release in deepseek-ai's original layout, the grid written where `--out`
says (#28). Slow: 576 tokens on the CPU; the in-process tests are in tests/unit/test_inference_cli.py."""

from __future__ import annotations

import shutil

from PIL import Image


def test_generate_draws_a_released_checkpoints_grid_where_out_says(original_checkpoint, tokenizer_dir, tmp_path,
                                                                   monkeypatch, capsys):
    from model.generate import main

    release = tmp_path / "Janus-Pro-tiny"
    release.mkdir()
    for folder in (original_checkpoint, tokenizer_dir):
        for file in folder.iterdir():
            shutil.copy(file, release / file.name)
    here = tmp_path / "cwd"
    here.mkdir()
    monkeypatch.chdir(here)
    out = tmp_path / "samples" / "new" / "cat.png"
    main(["--checkpoint", str(release), "--prompt", "a cat", "-n", "1", "--cfg", "1", "--greedy", "--device", "cpu",
          "--out", str(out)])
    with Image.open(out) as grid:
        assert grid.size == (384, 384)
    assert list(here.iterdir()) == []  # nothing in the working directory
    assert f"wrote {out}: 1 prompt(s) x 1" in capsys.readouterr().out
