"""Janus-Pro Stage 2. `deepspeed launchers/stage2.py --model 7b --data MANIFEST... --init WEIGHTS --output DIR`

Defaults: Table 2 (model/stages.py). Any value: a flag (--help lists them) or --config FILE.yaml.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script by the deepspeed launcher
# Before torch allocates on the GPU: packed batches vary in length, expandable segments keep the cache unfragmented.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from launchers.extras import train_stage  # noqa: E402

if __name__ == "__main__":
    train_stage(2)  # without the [train] extra: one line naming the pip install
