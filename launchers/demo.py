"""`make demo`: the main job, end to end on what exists so far, on the CPU in about a minute.

Real photographs that scikit-image ships, with their descriptions, become understanding, generation
and text samples in the Janus token layout; they are written to an Arrow shard, read back, packed
into mixed-task rows and the tiny Janus-Pro trains on them (Stage II's trainable parts). Knobs:
DEMO_STEPS (default 30), DEMO_OUTPUT (default demo-output).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import skimage.data
import torch
from PIL import Image

from model.batch import pack_rows, sample_length
from model.chat_format import Turn, generation_sample, text_sample, understanding_sample
from model.config import preset_config
from model.images import encode_image, generation_image, pixel_values, understanding_image
from model.janus import JanusProForTraining
from model.manifest import read_shard, write_shard
from model.sample import TASKS, samples_from_table, samples_to_table
from model.stages import STAGES, set_trainable
from model.summary import parameter_counts
from model.tokenizer import SpecialTokens, build_tokenizer
from model.vq import vq_encode

DESCRIPTIONS = {
    "astronaut.png": "An astronaut in a white suit smiles in front of an American flag.",
    "chelsea.png": "A brown tabby cat with green eyes looks to the side.",
    "coffee.png": "A cup of coffee on a saucer with a spoon, seen from above.",
    "rocket.jpg": "A rocket lifts off from its launch pad into a clear blue sky.",
    "motorcycle_left.png": "A red motorcycle parked in a room next to a wall.",
    "hubble_deep_field.jpg": "Hundreds of distant galaxies glow against the black of deep space.",
}


def demo_samples(tokenizer, vq) -> list:
    root = Path(os.path.dirname(skimage.data.__file__))
    photos = {name: Image.open(root / name) for name in DESCRIPTIONS}
    gen_ids = vq_encode(vq, pixel_values([generation_image(im) for im in photos.values()]))
    samples = []
    for (name, photo), ids in zip(photos.items(), gen_ids, strict=True):
        caption = DESCRIPTIONS[name]
        turns = [Turn("user", "<image_placeholder>\nDescribe this image."), Turn("assistant", caption)]
        samples.append(understanding_sample(tokenizer, turns, [encode_image(understanding_image(photo))],
                                            key=f"und/{name}"))
        samples.append(generation_sample(tokenizer, caption, ids.tolist(), key=f"gen/{name}"))
        samples.append(text_sample(tokenizer, caption, key=f"text/{name}"))
    return samples


def main() -> None:
    steps = int(os.environ.get("DEMO_STEPS", "30"))
    out = Path(os.environ.get("DEMO_OUTPUT", "demo-output"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    start = time.time()

    tokenizer = build_tokenizer(out / "tokenizer", corpus=list(DESCRIPTIONS.values()) + ["Describe this image."])
    special = SpecialTokens.from_tokenizer(tokenizer)
    model = JanusProForTraining(preset_config("tiny", image_token_id=special.image_placeholder))
    for part, n in parameter_counts(model).items():
        print(f"  {part:<14} {n:>10,}")

    shard = out / "demo-00000.arrow"
    table = samples_to_table(demo_samples(tokenizer, model.model.vqmodel.eval()))
    write_shard(table, shard)
    samples = samples_from_table(read_shard(shard))
    print(f"wrote and read back {len(samples)} samples ({shard}, {shard.stat().st_size / 1e3:.0f} KB)")

    # Two rows of mixed tasks; the row length fits the longest pair of samples.
    rows = [samples[0::2], samples[1::2]]
    seq_len = max(sum(sample_length(s) for s in row) for row in rows)
    batch = pack_rows(rows, seq_len, special)
    stage = STAGES[2]
    trainable = set_trainable(model, stage.trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3,
                                  betas=stage.adam_betas, weight_decay=stage.weight_decay)
    model.train()
    print(f"training {len(trainable)} tensors for {steps} steps on 2 packed rows of {seq_len} tokens")
    for step in range(1, steps + 1):
        loss = model(batch)
        per_task = loss.loss_sum / loss.target_count.clamp(min=1)
        (loss.loss_sum.sum() / loss.target_count.sum()).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), stage.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1 or step % 10 == 0 or step == steps:
            losses = "  ".join(f"{t} {v:.3f}" for t, v in zip(TASKS, per_task.tolist(), strict=True))
            print(f"step {step:4d}  {losses}")
    print(f"demo finished in {time.time() - start:.0f}s; outputs in {out}/")


if __name__ == "__main__":
    main()
