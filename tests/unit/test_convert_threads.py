"""preprocess/job.py's shard_rows on several threads (how one tar spreads over the CPUs a task holds) gives
exactly the rows of one thread: same order, same tokens, same image bytes. No Ray: the task body itself."""

from __future__ import annotations

import io
import tarfile
import time

import pyarrow as pa

from preprocess.job import ordered_map, shard_rows
from preprocess.records import ConvertConfig
from preprocess.sources import list_shards


def small_photo_tar(path, photos, n: int):
    """`n` records of caption + a small crop of a real photo, each crop different."""
    images = [p.convert("RGB") for p in photos.values()]
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            image = images[i % len(images)]
            crop = image.crop((i % 50, i % 40, i % 50 + 96, i % 40 + 64))
            buffer = io.BytesIO()
            crop.save(buffer, format="PNG")
            for name, data in ((f"{i:05d}.png", buffer.getvalue()), (f"{i:05d}.txt", f"photo {i}, cropped".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_threads_give_the_serial_rows(photos, tokenizer_dir, tmp_path):
    tar = small_photo_tar(tmp_path / "00000.tar", photos, 160)
    (shard,) = list_shards([str(tar)], "auto", 10_000)
    desc = pa.Table.from_pylist([shard.to_dict()])
    cfg = ConvertConfig(task="understanding", tokenizer=str(tokenizer_dir))
    serial = pa.concat_tables(shard_rows(desc, cfg, chunk=16, threads=1))
    threaded = pa.concat_tables(shard_rows(desc, cfg, chunk=16, threads=4))
    assert serial.num_rows == 160 and serial.column("skip").null_count == 160
    # Shared tokenizer state made ~3% of threaded samples differ before tokenising was serialised.
    assert threaded.column("input_ids").to_pylist() == serial.column("input_ids").to_pylist()
    assert threaded.equals(serial)


def test_ordered_map_keeps_order_and_a_bounded_window():
    started = []

    def slow_for_early(i: int) -> int:
        started.append(i)
        if i < 3:  # the first items finish last: results handed out as they complete would come out of order
            time.sleep(0.05)
        return i * i

    results = ordered_map(slow_for_early, range(100), threads=3)
    assert next(results) == 0
    assert len(started) <= 6  # at most 2 x threads submitted ahead of the consumer
    assert list(results) == [i * i for i in range(1, 100)]
