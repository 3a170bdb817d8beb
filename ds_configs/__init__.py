"""DeepSpeed JSON templates, shipped as package data so an installed wheel finds them (pipeline/ds_config.py)."""
