"""The training data path: shards (reader.py) -> ratio mixing (mixer.py) -> packing (packer.py) -> micro-batches
(loader.py). `DataPipeline` is the entry; the trainer, validation and the benches use nothing else."""

from pipeline.data.loader import DataPipeline, TooLong

__all__ = ["DataPipeline", "TooLong"]
