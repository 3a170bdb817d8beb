"""The training data path: shards (reader.py) -> ratio mixing (mixer.py) -> packing (packer.py) -> micro-batches
(loader.py). `DataPipeline` is the entry; the trainer, validation and the benches use nothing else. coverage.py counts
how many times each sample entered a micro-batch (the pipeline's `coverage`, saved in its state)."""

from pipeline.data.loader import DataPipeline, TooLong

__all__ = ["DataPipeline", "TooLong"]
