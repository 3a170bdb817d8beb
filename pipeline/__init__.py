"""Training-time data path and the DeepSpeed ZeRO-3 loop (shards, mixing, packing, checkpoints)."""
