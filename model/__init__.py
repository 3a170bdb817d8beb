"""Janus-Pro for training: what a sample is (chat format, token layout, image transforms, the Arrow
schema) and the model with its packed mixed-task forward. Imports nothing of ours and never ray."""
