"""Export a training run. `python launchers/export.py --checkpoint RUN_DIR [--step N] --out DIR --layout transformers`

--layout original writes deepseek-ai's layout for the official inference code; --dtype bf16 (default) or fp32.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable as a plain script

from launchers.extras import call  # noqa: E402

if __name__ == "__main__":
    call("pipeline.export:main")  # without the [train] extra: one line naming the pip install
